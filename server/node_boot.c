/*
 * node_boot.c - Raft's start: from the log, hard state and snapshot point in storage, or, for
 * a new member, from the member list (--initial-cluster).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/node_internal.h"

static uint64_t seed_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int node_raft_boot(node *n)
{
	server_ctx *sc = n->n_sc;
	storage_reader *r;
	storage_arena a;
	storage_arena_init(&a);
	int rc = storage_read_begin(sc->st, &r);
	if (rc)
		return rc;
	storage_log_state ls;
	storage_stats stats;
	rc = storage_read_log(r, &a, &ls);
	if (rc == 0)
		rc = storage_stat(sc->st, &stats);
	struct raft_config cfg;
	memset(&cfg, 0, sizeof(cfg));
	struct raft_snapshot snap;
	memset(&snap, 0, sizeof(snap));
	struct raft_entry *entries = NULL;
	if (rc == 0) {
		cfg.id = sc->mi.member_id;
		/* Entries applied: this member was in the cluster (a member applies nothing before
		 * it is added), so peers refusing it as unknown means it was removed since. */
		n->n_was_member = stats.st_applied_index > 0;
		uint64_t ids[MEMBER_LIST_MAX];
		char urls[MEMBER_LIST_MAX][256];
		int learner[MEMBER_LIST_MAX];
		size_t k = members_peers(sc->members, ids, urls, learner, MEMBER_LIST_MAX);
		for (size_t i = 0; i < k && i < RAFT_MAX_MEMBERS; i++) {
			if (learner[i])
				cfg.conf.learners[cfg.conf.n_learners++] = ids[i];
			else
				cfg.conf.voters[cfg.conf.n_voters++] = ids[i];
		}
		/* A member joining an existing cluster learns the configuration from the leader's
		 * log (its configuration entries carry the whole configuration). */
		if (strcmp(sc->cfg->initial_cluster_state, "existing") == 0 && ls.ls_snap_index == 0 &&
		    ls.ls_n_entries == 0 && stats.st_applied_index == 0) {
			cfg.conf.n_voters = 0;
			cfg.conf.n_learners = 0;
		}
		uint64_t hb = sc->cfg->heartbeat_ms ? sc->cfg->heartbeat_ms : 100;
		cfg.election_tick = (unsigned)(sc->cfg->election_ms / hb);
		if (cfg.election_tick < 2)
			cfg.election_tick = 2;
		cfg.heartbeat_tick = 1;
		cfg.prevote = true; /* etcd 3.5's default */
		cfg.check_quorum = true;
		cfg.max_inflight_msgs = 256;
		cfg.max_inflight_bytes = 64ULL << 20;
		/* An entry is one request plus its 17-byte header: the largest request etcd
		 * takes must fit (raft refuses entries above max_msg_bytes). */
		cfg.max_msg_bytes = sc->cfg->max_request_bytes + 4096;
		if (cfg.max_msg_bytes < (1ULL << 20))
			cfg.max_msg_bytes = 1ULL << 20;
		cfg.seed = sc->mi.member_id ^ seed_now();
		cfg.hard_state.term = ls.ls_term;
		cfg.hard_state.vote = ls.ls_vote;
		cfg.hard_state.commit = ls.ls_commit;
		uint64_t applied = stats.st_applied_index;
		if (ls.ls_snap_index == 0 && ls.ls_n_entries == 0 && applied > 0) {
			/* A data dir with state but no log (written before the log was kept, or
			 * restored or imported): its state is the snapshot point, and is recorded
			 * as such, or the next start would find a log that begins mid-air. */
			ls.ls_snap_index = applied;
			ls.ls_snap_term = ls.ls_term ? ls.ls_term : 1;
			storage_batch *b;
			rc = storage_batch_begin(sc->st, &b);
			if (rc == 0) {
				rc = storage_batch_log_snapshot(b, ls.ls_snap_index, ls.ls_snap_term, &cfg.conf,
								sizeof(cfg.conf));
				if (rc == 0)
					rc = storage_batch_commit(b, applied);
				else
					storage_batch_abort(b);
			}
		}
		if (ls.ls_snap_index > 0) {
			snap.meta.index = ls.ls_snap_index;
			snap.meta.term = ls.ls_snap_term;
			if (ls.ls_snap_conf && ls.ls_snap_conf_len == sizeof(struct raft_conf))
				memcpy(&snap.meta.conf, ls.ls_snap_conf, sizeof(struct raft_conf));
			else
				snap.meta.conf = cfg.conf;
			cfg.snapshot = &snap;
			n->n_log_snapshot = ls.ls_snap_index;
			if (cfg.hard_state.commit < ls.ls_snap_index)
				cfg.hard_state.commit = ls.ls_snap_index;
			if (cfg.hard_state.term < ls.ls_snap_term)
				cfg.hard_state.term = ls.ls_snap_term;
		}
		if (ls.ls_n_entries) {
			entries = calloc(ls.ls_n_entries, sizeof(*entries));
			if (entries == NULL)
				rc = STORAGE_ERR_NOMEM;
			for (size_t i = 0; entries && i < ls.ls_n_entries; i++)
				entries[i] = (struct raft_entry){ls.ls_entries[i].le_term, ls.ls_entries[i].le_index,
								 ls.ls_entries[i].le_type, ls.ls_entries[i].le_len,
								 (uint8_t *)ls.ls_entries[i].le_data};
			cfg.entries = entries;
			cfg.n_entries = ls.ls_n_entries;
		}
		if (applied < ls.ls_snap_index)
			applied = ls.ls_snap_index;
		/* Raft's applied index cannot pass its log. After a snapshot install the store can
		 * be ahead of the log (the copy was taken at A, the snapshot point is S <= A, and
		 * entries S+1..A may not be on disk yet): Raft starts at the log's end and the
		 * apply loop skips what the store already holds (n_applied stays A). */
		uint64_t last = ls.ls_n_entries ? ls.ls_entries[ls.ls_n_entries - 1].le_index : ls.ls_snap_index;
		uint64_t raft_applied = applied < last ? applied : last;
		/* The commit index is not always persisted (see process_ready); what was applied
		 * was committed. */
		if (cfg.hard_state.commit < raft_applied)
			cfg.hard_state.commit = raft_applied;
		cfg.applied = raft_applied;
		atomic_store(&n->n_applied, applied);
		atomic_store(&n->n_term, cfg.hard_state.term);
	}
	if (rc == 0) {
		int err = raft_init(&n->n_raft, &cfg);
		if (err) {
			log_at(LOG_FATAL, "cannot start raft", "error", raft_strerror(err), NULL);
			rc = STORAGE_ERR_CORRUPT;
		}
	}
	free(entries);
	storage_read_end(r);
	storage_arena_free(&a);
	if (rc == 0)
		node_conf_status(n);
	return rc;
}
