package deps
import (
 _ "github.com/hashicorp/raft"
 _ "github.com/hashicorp/raft-wal"
 _ "github.com/hashicorp/raft-boltdb/v2"
 _ "github.com/hashicorp/go-memdb"
 _ "github.com/hashicorp/go-hclog"
 _ "github.com/hashicorp/hcl"
 _ "github.com/spiffe/go-spiffe/v2/workloadapi"
 _ "github.com/spiffe/go-spiffe/v2/federation"
 _ "github.com/golang-jwt/jwt/v5"
 _ "github.com/urfave/cli/v2"
 _ "github.com/stretchr/testify/require"
 _ "google.golang.org/grpc"
 _ "google.golang.org/protobuf/proto"
 _ "github.com/prometheus/client_golang/prometheus"
 _ "golang.org/x/sys/unix"
)
