#include <lmdb.h>
#include <uv.h>
#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <stdio.h>
int main(void){ printf("%s %s %s\n", mdb_version(0,0,0), uv_version_string(), grpc_version_string()); return 0; }
