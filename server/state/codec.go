package state

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/proto/ferrypb"
)

// commandFormat is the first byte of every log entry ferry writes. A later
// encoding gets a new number; the FSM refuses formats it does not know.
const commandFormat byte = 1

// MaxCommandSize is the largest encoded command ferry puts in the Raft log.
// Larger entries delay heartbeats and destabilise leadership (hashicorp/raft's
// SuggestedMaxDataSize is 512 KiB).
const MaxCommandSize = 512 * 1024

// ErrCommandTooLarge is returned for a command whose encoding exceeds MaxCommandSize.
var ErrCommandTooLarge = errors.New("state: command exceeds 512 KiB")

// EncodeCommand turns a command into the bytes of one Raft log entry.
func EncodeCommand(cmd *ferrypb.Command) ([]byte, error) {
	body, err := proto.Marshal(cmd)
	if err != nil {
		return nil, fmt.Errorf("state: encode command: %w", err)
	}
	if len(body)+1 > MaxCommandSize {
		return nil, fmt.Errorf("%w (%d bytes)", ErrCommandTooLarge, len(body)+1)
	}
	out := make([]byte, 0, len(body)+1)
	out = append(out, commandFormat)
	return append(out, body...), nil
}

// DecodeCommand parses the bytes of one Raft log entry.
func DecodeCommand(data []byte) (*ferrypb.Command, error) {
	if len(data) == 0 {
		return nil, errors.New("state: empty log entry")
	}
	if data[0] != commandFormat {
		return nil, fmt.Errorf("state: unknown command format %d", data[0])
	}
	cmd := new(ferrypb.Command)
	if err := proto.Unmarshal(data[1:], cmd); err != nil {
		return nil, fmt.Errorf("state: decode command: %w", err)
	}
	return cmd, nil
}

// batchField is Command.batch's field number, and commandsField is
// CommandBatch.commands'.
const (
	batchField    protowire.Number = 50
	commandsField protowire.Number = 1
)

// EncodeBatch joins encoded commands (each as EncodeCommand returned it) into
// one log entry carrying a CommandBatch, without decoding them: a repeated
// message field is the concatenation of its elements. The FSM answers with one
// result per command in CommandResult.Batch, in order.
func EncodeBatch(encoded [][]byte) ([]byte, error) {
	var inner []byte
	for _, e := range encoded {
		if len(e) == 0 || e[0] != commandFormat {
			return nil, errors.New("state: batch element is not an encoded command")
		}
		inner = protowire.AppendTag(inner, commandsField, protowire.BytesType)
		inner = protowire.AppendBytes(inner, e[1:])
	}
	out := make([]byte, 0, len(inner)+16)
	out = append(out, commandFormat)
	out = protowire.AppendTag(out, batchField, protowire.BytesType)
	out = protowire.AppendBytes(out, inner)
	if len(out) > MaxCommandSize {
		return nil, fmt.Errorf("%w (batch of %d bytes)", ErrCommandTooLarge, len(out))
	}
	return out, nil
}
