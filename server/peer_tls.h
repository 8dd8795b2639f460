/*
 * peer_tls.h - PRIVATE to the peer target: what peer.c needs of a peer_tls (peer_tls.c).
 */
#ifndef KEELSON_SERVER_PEER_TLS_H
#define KEELSON_SERVER_PEER_TLS_H

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "server/peer.h"

struct peer_tls {
	SSL_CTX *pt_server;  /* the acceptor's context */
	SSL_CTX *pt_client;  /* the dialer's context */
	X509_CRL *pt_crl;    /* NULL: none */
	char *pt_allowed_cn; /* NULL: any */
	int pt_verify;       /* the dialer verifies the acceptor (not --peer-auto-tls) */
	int pt_verify_client; /* the acceptor requires and verifies a client certificate */
	int pt_check_san;     /* the acceptor checks the dialer's certificate names its address */
};

/* Copies src into *dst taking new references (a transport's own); 0 or PEER_ENOMEM. */
int peer_tls__hold(struct peer_tls *dst, const struct peer_tls *src);
/* Drops the references *t holds (not t itself); t may be all zero. */
void peer_tls__release(struct peer_tls *t);

/*
 * The checks OpenSSL does not do itself, on one certificate of a verified chain at depth
 * (0: the peer's own): on the acceptor, etcd's checkSAN against remote_addr (the dialer's
 * "ip:port"; may block on DNS lookups, see peer_tls.c); the allowed CN; and on the acceptor
 * the CRL. X509_V_OK, or the X509_V_ERR_* to fail the handshake with (OpenSSL then sends the
 * alert) and the reason in err.
 */
int peer_tls__check_cert(const struct peer_tls *t, X509 *cert, int depth, int acceptor,
			 const char *remote_addr, char *err, size_t errlen);

#endif /* KEELSON_SERVER_PEER_TLS_H */
