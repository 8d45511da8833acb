package service

import (
	"fmt"
	"time"

	"github.com/hashicorp/hcl/hcl/token"

	"github.com/ferry-id/ferry/internal/config"
)

type fileConfig struct {
	Bridge     *bridgeBlock           `hcl:"bridge"`
	UnusedKeys map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

type bridgeBlock struct {
	ListenAddr   string                 `hcl:"listen_addr"`
	BaseURL      string                 `hcl:"base_url"`
	TLSCertFile  string                 `hcl:"tls_cert_file"`
	TLSKeyFile   string                 `hcl:"tls_key_file"`
	DataDir      string                 `hcl:"data_dir"`
	ServerSocket string                 `hcl:"server_socket"`
	Sockets      []string               `hcl:"server_sockets"`
	Insecure     bool                   `hcl:"insecure_socket"`
	ServerAddr   string                 `hcl:"server_address"`
	Addresses    []string               `hcl:"server_addresses"`
	WorkloadAPI  string                 `hcl:"workload_api_socket"`
	Name         string                 `hcl:"name"`
	KeyLifetime  string                 `hcl:"key_lifetime"`
	KeyRetire    string                 `hcl:"key_retire_after"`
	LogLevel     string                 `hcl:"log_level"`
	LogFormat    string                 `hcl:"log_format"`
	UnusedKeys   map[string][]token.Pos `hcl:",unusedKeyPositions"`
}

// FileConfig is bridge.conf as read.
type FileConfig struct {
	Config
	LogLevel, LogFormat string
}

// LoadConfig reads bridge.conf; relative paths are relative to the file.
func LoadConfig(path string) (FileConfig, error) {
	var f fileConfig
	if err := config.Decode(path, &f); err != nil {
		return FileConfig{}, err
	}
	b := f.Bridge
	if b == nil {
		return FileConfig{}, fmt.Errorf("service: %s has no bridge block", path)
	}
	out := FileConfig{LogLevel: b.LogLevel, LogFormat: b.LogFormat, Config: Config{
		ListenAddr:     b.ListenAddr,
		BaseURL:        b.BaseURL,
		TLSCertFile:    config.Resolve(path, b.TLSCertFile),
		TLSKeyFile:     config.Resolve(path, b.TLSKeyFile),
		DataDir:        config.Resolve(path, b.DataDir),
		WorkloadAPI:    b.WorkloadAPI,
		Name:           b.Name,
		InsecureSocket: b.Insecure,
	}}
	for _, p := range append([]string{b.ServerSocket}, b.Sockets...) {
		if p != "" {
			out.ServerSockets = append(out.ServerSockets, config.Resolve(path, p))
		}
	}
	for _, a := range append([]string{b.ServerAddr}, b.Addresses...) {
		if a != "" {
			out.ServerAddresses = append(out.ServerAddresses, a)
		}
	}
	for _, d := range []struct {
		name string
		in   string
		out  *time.Duration
	}{{"key_lifetime", b.KeyLifetime, &out.KeyLifetime}, {"key_retire_after", b.KeyRetire, &out.KeyRetireAfter}} {
		if d.in == "" {
			continue
		}
		v, err := time.ParseDuration(d.in)
		if err != nil {
			return FileConfig{}, fmt.Errorf("service: %s: %w", d.name, err)
		}
		*d.out = v
	}
	if out.ListenAddr == "" {
		return FileConfig{}, fmt.Errorf("service: listen_addr is required")
	}
	if out.DataDir == "" {
		return FileConfig{}, fmt.Errorf("service: data_dir is required")
	}
	switch {
	case len(out.ServerSockets) > 0 && len(out.ServerAddresses) > 0:
		return FileConfig{}, fmt.Errorf("service: server sockets and server addresses do not go together: a replica follows servers one way")
	case len(out.ServerSockets) == 0 && len(out.ServerAddresses) == 0:
		out.ServerSockets = []string{config.AdminSocket}
	}
	if len(out.ServerAddresses) > 0 && out.WorkloadAPI == "" {
		out.WorkloadAPI = "unix://" + config.WorkloadAPISocket
	}
	if (out.TLSCertFile == "") != (out.TLSKeyFile == "") {
		return FileConfig{}, fmt.Errorf("service: tls_cert_file and tls_key_file go together")
	}
	return out, nil
}

// ConfigKeys lists every setting bridge.conf accepts (docs/config.md is
// checked against it).
func ConfigKeys() []string { return config.Keys(fileConfig{}) }
