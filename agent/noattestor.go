package agent

import (
	"context"
	"errors"
)

// noAttestor stands in when the config names no node attestor: an agent that
// saved its SVID can still start; one that must attest gets a clear error.
type noAttestor struct{}

var errNoAttestor = errors.New("agent: no node attestor configured (set join_token, pass --join-token, or configure x509pop or a cloud attestor such as azure_imds)")

func (noAttestor) Name() string                                    { return "none" }
func (noAttestor) Payload(context.Context) ([]byte, error)         { return nil, errNoAttestor }
func (noAttestor) Respond(context.Context, []byte) ([]byte, error) { return nil, errNoAttestor }
