/*
 * etcd_import_fuzz.c - libFuzzer target: the parsers of server/etcdimport.c that read what an
 * etcd data dir holds beyond the checked file formats: a member's JSON (bucket "members" and
 * ConfChange contexts), a raft entry's payload (InternalRaftRequest, or a v2 Request) into a
 * Keelson entry, a ConfChange on the member list, a v2 store's JSON (member list of a
 * snapshot file) and a v2 request publishing a member's attributes. The first input byte picks one; the rest
 * is the payload. None may crash, leak or read out of bounds; what they accept must be sane.
 * The file is included so that its static functions are reachable; what it calls on the
 * storage and server side is stubbed by run_api_fuzz.sh and never reached here.
 */
#include "server/etcdimport.c"

static import_ctx fz_ctx;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	const uint8_t *p = data + 1;
	size_t n = size - 1;
	switch (data[0] % 5) {
	case 3: {
		/* a v2 store's JSON (a snapshot file's), then its member list */
		import_ctx *c = calloc(1, sizeof(*c));
		if (c == NULL)
			return 0;
		v2_store_members(c, p, n);
		if (c->n_members > IMPORT_MAX_MEMBERS || c->n_removed > IMPORT_MAX_MEMBERS)
			abort();
		import_ctx_free(c);
		free(c);
		break;
	}
	case 4: {
		/* a v2 request (a member publishing its attributes) on a one-member list */
		import_ctx *c = calloc(1, sizeof(*c));
		if (c == NULL)
			return 0;
		c->n_members = 1;
		etcdserverpb__member__init(&c->members[0]);
		c->members[0].id = 0xbdae9bbc11dd390dULL;
		v2_member_attributes(c, p, n);
		import_ctx_free(c);
		free(c);
		break;
	}
	case 0: {
		Etcdserverpb__Member m;
		if (member_from_json(p, n, &m) == 0) {
			for (size_t i = 0; i < m.n_peerurls; i++)
				if (m.peerurls[i] == NULL)
					abort();
			member_clear(&m);
		}
		break;
	}
	case 1: {
		uint8_t *out = NULL;
		size_t len = 0;
		node_op op;
		if (convert_normal(p, n, &out, &len, &op) == 0 && (len == 0) != (out == NULL))
			abort(); /* an entry is either empty or has its bytes */
		if (len != 0 && (len < 17 || out[0] != (uint8_t)op))
			abort();
		free(out);
		break;
	}
	default: {
		char err[256];
		/* A member list that lives across inputs, as it would across entries; bounded. */
		apply_conf_change(&fz_ctx, p, n, 1, err, sizeof(err));
		if (fz_ctx.n_members > IMPORT_MAX_MEMBERS || fz_ctx.n_removed > IMPORT_MAX_MEMBERS)
			abort();
		if (fz_ctx.n_members == IMPORT_MAX_MEMBERS || fz_ctx.n_removed == IMPORT_MAX_MEMBERS) {
			import_ctx_free(&fz_ctx);
			memset(&fz_ctx, 0, sizeof(fz_ctx));
		}
		break;
	}
	}
	return 0;
}
