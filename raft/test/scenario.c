/* scenario.c - data-driven Raft scenarios (etcd-io/raft testdata style).
 *
 *   scenario_test FILE...         run scripts, exit 1 on any mismatch
 *   RAFT_REWRITE=1 scenario_test  rewrite the expected output in place
 *
 * A script is a sequence of blocks:
 *   command arg...
 *   ----
 *   expected output (exact)
 *   <blank line>
 * Lines starting with '#' between blocks are comments. Commands:
 *   add-nodes N [learners=L] [joiners=J] [prevote] [checkquorum]
 *             [election=E] [heartbeat=H] [inflight=I] [maxmsg=B] [seed=S]
 *   campaign ID | propose ID DATA | read-index ID CTX | transfer ID TO
 *   conf ID add|learner|remove NODE | compact ID | restart ID
 *   tick ID [N]  (ID 0: every node) | process ID | deliver [ID] | drop [ID]
 *   stabilize | isolate ID | cut A B | heal | status ID... | log ID... | msgs
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"

static struct tcluster tc;
static bool have_tc;

static void run(char *line, FILE *out)
{
    char *argv[32];
    int argc = 0, rv = 0;
    for (char *t = strtok(line, " \t"); t && argc < 32; t = strtok(NULL, " \t"))
        argv[argc++] = t;
    if (argc == 0)
        return;
    tc.log = out;
#define ID(i) ((uint64_t)strtoull(argv[i], NULL, 10))
#define R(i) (tc.nodes[ID(i)].r)
    if (!strcmp(argv[0], "add-nodes")) {
        struct tc_config c;
        size_t learners = 0, joiners = 0, n = (size_t)ID(1);
        tc_default_config(&c);
        for (int i = 2; i < argc; i++) {
            char *eq = strchr(argv[i], '=');
            unsigned long long v = eq ? strtoull(eq + 1, NULL, 10) : 0;
            if (!strcmp(argv[i], "prevote"))
                c.prevote = true;
            else if (!strcmp(argv[i], "checkquorum"))
                c.check_quorum = true;
            else if (!strncmp(argv[i], "learners=", 9))
                learners = v;
            else if (!strncmp(argv[i], "joiners=", 8))
                joiners = v;
            else if (!strncmp(argv[i], "election=", 9))
                c.election = (unsigned)v;
            else if (!strncmp(argv[i], "heartbeat=", 10))
                c.heartbeat = (unsigned)v;
            else if (!strncmp(argv[i], "inflight=", 9))
                c.max_inflight = (unsigned)v;
            else if (!strncmp(argv[i], "maxmsg=", 7))
                c.max_msg_bytes = v;
            else if (!strncmp(argv[i], "seed=", 5))
                c.seed = v;
        }
        if (have_tc)
            tc_close(&tc);
        tc_init(&tc, n, learners, n + learners + joiners, &c);
        tc.log = out;
        have_tc = true;
    } else if (!strcmp(argv[0], "campaign")) {
        rv = raft_campaign(R(1));
    } else if (!strcmp(argv[0], "propose") && argc >= 3) {
        rv = raft_propose(R(1), argv[2], (uint32_t)strlen(argv[2]), NULL);
    } else if (!strcmp(argv[0], "read-index") && argc >= 3) {
        rv = raft_read_index(R(1), argv[2], (uint32_t)strlen(argv[2]));
    } else if (!strcmp(argv[0], "transfer") && argc >= 3) {
        rv = raft_transfer_leader(R(1), ID(2));
    } else if (!strcmp(argv[0], "conf") && argc >= 4) {
        enum raft_conf_op op = !strcmp(argv[2], "add")       ? RAFT_CONF_ADD_VOTER
                               : !strcmp(argv[2], "learner") ? RAFT_CONF_ADD_LEARNER
                                                             : RAFT_CONF_REMOVE;
        rv = raft_propose_conf_change(R(1), op, ID(3), NULL);
    } else if (!strcmp(argv[0], "compact")) {
        rv = tc_compact(&tc, ID(1));
    } else if (!strcmp(argv[0], "restart")) {
        tc_restart(&tc, ID(1));
    } else if (!strcmp(argv[0], "tick")) {
        tc_tick(&tc, ID(1), argc >= 3 ? (unsigned)ID(2) : 1);
    } else if (!strcmp(argv[0], "process")) {
        tc_process(&tc, ID(1));
    } else if (!strcmp(argv[0], "deliver")) {
        tc_deliver(&tc, argc >= 2 ? ID(1) : 0);
    } else if (!strcmp(argv[0], "drop")) {
        if (argc >= 2) {
            tc_drop_queue(&tc, ID(1));
        } else {
            for (size_t i = 0; i < tc.nq; i++)
                tc_msg_free(&tc.q[i]);
            tc.nq = 0;
        }
    } else if (!strcmp(argv[0], "stabilize")) {
        tc_stabilize(&tc);
    } else if (!strcmp(argv[0], "isolate")) {
        tc_isolate(&tc, ID(1));
    } else if (!strcmp(argv[0], "cut") && argc >= 3) {
        tc_cut(&tc, ID(1), ID(2));
    } else if (!strcmp(argv[0], "heal")) {
        tc_heal(&tc);
    } else if (!strcmp(argv[0], "status")) {
        for (int i = 1; i < argc; i++)
            tc_print_status(&tc, ID(i), out);
    } else if (!strcmp(argv[0], "log")) {
        for (int i = 1; i < argc; i++)
            tc_print_log(&tc, ID(i), out);
    } else if (!strcmp(argv[0], "msgs")) {
        for (size_t i = 0; i < tc.nq; i++) {
            char buf[1024];
            tc_fmt_msg(&tc.q[i], buf, sizeof(buf));
            fprintf(out, "%s\n", buf);
        }
    } else {
        fprintf(out, "unknown command %s\n", argv[0]);
    }
    if (rv != 0)
        fprintf(out, "error: %s\n", raft_strerror(rv));
    tc.log = NULL;
}

/* Runs one script; returns the number of mismatching blocks. */
static int run_file(const char *path, bool rewrite)
{
    FILE *f = fopen(path, "r");
    char *line = NULL, *cmd = NULL;
    size_t cap = 0;
    int bad = 0, lineno = 0;
    char *rewritten = NULL;
    size_t rwlen = 0;
    FILE *rw = open_memstream(&rewritten, &rwlen);
    if (!f) {
        fprintf(stderr, "%s: cannot open\n", path);
        return 1;
    }
    have_tc = false;
    while (getline(&line, &cap, f) > 0) {
        lineno++;
        line[strcspn(line, "\n")] = 0;
        if (line[0] == '#' || line[0] == 0) {
            fprintf(rw, "%s\n", line);
            continue;
        }
        /* a command, then ----, then expected output until a blank line */
        free(cmd);
        cmd = strdup(line);
        int cmd_line = lineno;
        char *expected = NULL, *actual = NULL;
        size_t elen = 0, alen = 0;
        FILE *ef = open_memstream(&expected, &elen);
        if (getline(&line, &cap, f) <= 0 || strncmp(line, "----", 4) != 0) {
            fprintf(stderr, "%s:%d: expected ----\n", path, cmd_line);
            fclose(ef);
            free(expected);
            bad++;
            break;
        }
        lineno++;
        while (getline(&line, &cap, f) > 0) {
            lineno++;
            if (line[0] == '\n')
                break;
            fputs(line, ef);
        }
        fclose(ef);
        FILE *af = open_memstream(&actual, &alen);
        char *work = strdup(cmd);
        run(work, af);
        free(work);
        fclose(af);
        if (alen == 0) {
            free(actual);
            actual = strdup("ok\n");
        }
        if (strcmp(expected, actual) != 0) {
            if (!rewrite) {
                fprintf(stderr, "%s:%d: %s\n--- expected:\n%s--- actual:\n%s\n", path, cmd_line, cmd,
                        expected, actual);
                bad++;
            }
        }
        fprintf(rw, "%s\n----\n%s\n", cmd, actual);
        free(expected);
        free(actual);
    }
    fclose(f);
    fclose(rw);
    if (rewrite) {
        /* drop the trailing blank line the loop adds after the last block */
        while (rwlen > 1 && rewritten[rwlen - 1] == '\n' && rewritten[rwlen - 2] == '\n')
            rewritten[--rwlen] = 0;
        f = fopen(path, "w");
        if (f) {
            fwrite(rewritten, 1, rwlen, f);
            fclose(f);
        }
    }
    free(rewritten);
    free(line);
    free(cmd);
    if (have_tc)
        tc_close(&tc);
    have_tc = false;
    return bad;
}

int main(int argc, char **argv)
{
    bool rewrite = getenv("RAFT_REWRITE") != NULL;
    int failed = 0;
    for (int i = 1; i < argc; i++) {
        int bad = run_file(argv[i], rewrite);
        printf("%s %s%s\n", bad ? "FAIL" : "PASS", argv[i], rewrite ? " (rewritten)" : "");
        failed += bad != 0;
    }
    printf("%d scripts, %d failed\n", argc - 1, failed);
    return failed ? 1 : 0;
}
