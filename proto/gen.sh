#!/usr/bin/env bash
# Regenerates the Go code in proto/ferrypb from the .proto files here.
# protoc comes from Debian (protobuf-compiler); the Go plugins are pinned below.
set -euo pipefail
cd "$(dirname "$0")"
GOBIN="$(go env GOPATH)/bin"
go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.1
command -v protoc >/dev/null || { echo "protoc missing: apt-get install protobuf-compiler" >&2; exit 1; }
PATH="$GOBIN:$PATH" protoc -I . \
  --go_out=ferrypb --go_opt=paths=source_relative \
  --go-grpc_out=ferrypb --go-grpc_opt=paths=source_relative \
  *.proto
