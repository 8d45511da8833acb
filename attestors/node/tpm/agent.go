package tpm

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"github.com/google/go-attestation/attest"

	"github.com/ferry-id/ferry/attestors/node"
)

// AgentConfig configures the agent half.
type AgentConfig struct {
	// Device is the TPM: a character device (default DefaultDevice) or the
	// unix socket of a software TPM's command channel (swtpm socket
	// --server type=unixio).
	Device string
}

// Agent is the agent half. The TPM is open only while the agent works with
// it, never across a round trip to the server: the AK made by Payload is
// kept as its TPM-wrapped blob and loaded again by Respond.
type Agent struct {
	device string

	mu   sync.Mutex
	blob []byte // the AK of the attestation under way
}

var _ node.AgentAttestor = (*Agent)(nil)

// NewAgent returns the agent half.
func NewAgent(c AgentConfig) (*Agent, error) {
	if c.Device == "" {
		c.Device = DefaultDevice
	}
	if _, err := os.Stat(c.Device); err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	return &Agent{device: c.Device}, nil
}

// Name returns "tpm".
func (a *Agent) Name() string { return Name }

func (a *Agent) open() (*attest.TPM, error) {
	ch, err := openChannel(a.device)
	if err != nil {
		return nil, err
	}
	t, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: ch})
	if err != nil {
		ch.Close()
		return nil, fmt.Errorf("tpm: open %s: %w", a.device, err)
	}
	return t, nil
}

// Payload reads the EK certificate and makes an AK.
func (a *Agent) Payload(context.Context) ([]byte, error) {
	t, err := a.open()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	eks, err := t.EKs()
	if err != nil {
		return nil, fmt.Errorf("tpm: endorsement keys: %w", err)
	}
	var cert []byte
	for _, ek := range eks {
		if ek.Certificate != nil {
			cert = ek.Certificate.Raw
			break
		}
	}
	if cert == nil {
		return nil, errors.New("tpm: the TPM holds no EK certificate (NV index 0x01c00002)")
	}
	ak, err := t.NewAK(nil)
	if err != nil {
		return nil, fmt.Errorf("tpm: make attestation key: %w", err)
	}
	defer ak.Close(t)
	blob, err := ak.Marshal()
	if err != nil {
		return nil, fmt.Errorf("tpm: attestation key: %w", err)
	}
	a.mu.Lock()
	a.blob = blob
	a.mu.Unlock()
	return json.Marshal(payload{EKCert: cert, AK: ak.AttestationParameters()})
}

// Respond has the TPM activate the server's credential with the AK.
func (a *Agent) Respond(_ context.Context, c []byte) ([]byte, error) {
	a.mu.Lock()
	blob := a.blob
	a.blob = nil
	a.mu.Unlock()
	if blob == nil {
		return nil, errors.New("tpm: challenge before payload")
	}
	var ch challenge
	if err := json.Unmarshal(c, &ch); err != nil {
		return nil, fmt.Errorf("tpm: malformed challenge: %w", err)
	}
	t, err := a.open()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	ak, err := t.LoadAK(blob)
	if err != nil {
		return nil, fmt.Errorf("tpm: load attestation key: %w", err)
	}
	defer ak.Close(t)
	secret, err := ak.ActivateCredential(t, attest.EncryptedCredential{Credential: ch.Credential, Secret: ch.Secret})
	if err != nil {
		return nil, fmt.Errorf("tpm: activate credential: %w", err)
	}
	return json.Marshal(response{Secret: secret})
}

// channel is a TPM command channel: a device file, or a stream socket on
// which responses are read whole (a TPM response's header holds its size).
type channel struct {
	rw     io.ReadWriteCloser
	stream bool
	buf    []byte
}

func openChannel(device string) (*channel, error) {
	fi, err := os.Stat(device)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	if fi.Mode()&os.ModeSocket != 0 {
		conn, err := net.Dial("unix", device)
		if err != nil {
			return nil, fmt.Errorf("tpm: %w", err)
		}
		return &channel{rw: conn, stream: true}, nil
	}
	f, err := os.OpenFile(device, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	return &channel{rw: f}, nil
}

func (c *channel) Write(p []byte) (int, error) { return c.rw.Write(p) }
func (c *channel) Close() error                { return c.rw.Close() }

// MeasurementLog is not used: this attestor makes no quote.
func (c *channel) MeasurementLog() ([]byte, error) {
	return nil, errors.New("tpm: no event log on this channel")
}

// maxResponse bounds a response read from a socket.
const maxResponse = 64 << 10

func (c *channel) Read(p []byte) (int, error) {
	if !c.stream {
		return c.rw.Read(p)
	}
	if len(c.buf) == 0 {
		hdr := make([]byte, 10)
		if _, err := io.ReadFull(c.rw, hdr); err != nil {
			return 0, err
		}
		size := binary.BigEndian.Uint32(hdr[2:6])
		if size < 10 || size > maxResponse {
			return 0, fmt.Errorf("tpm: response of %d bytes", size)
		}
		c.buf = make([]byte, size)
		copy(c.buf, hdr)
		if _, err := io.ReadFull(c.rw, c.buf[10:]); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.buf)
	c.buf = c.buf[n:]
	return n, nil
}
