// Package deps pins modules the project uses before their first import lands.
package deps

import (
	_ "github.com/golang-jwt/jwt/v5"
	_ "github.com/hashicorp/go-hclog"
	_ "github.com/hashicorp/go-memdb"
	_ "github.com/hashicorp/hcl"
	_ "github.com/hashicorp/raft"
	_ "github.com/hashicorp/raft-boltdb/v2"
	_ "github.com/hashicorp/raft-wal"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/spiffe/go-spiffe/v2/federation"
	_ "github.com/spiffe/go-spiffe/v2/workloadapi"
	_ "github.com/stretchr/testify/require"
	_ "github.com/urfave/cli/v2"
	_ "golang.org/x/sys/unix"
	_ "google.golang.org/grpc"
	_ "google.golang.org/protobuf/proto"
)
