// Package sdnotify tells the service manager what state a ferry process is in,
// with the datagram protocol of sd_notify(3): READY=1 once the role serves,
// RELOADING=1 while it applies a reloaded configuration, STOPPING=1 when it
// begins to shut down, STATUS= for `systemctl status`.
//
// The protocol is one datagram of newline-separated assignments sent to the
// unix socket named by $NOTIFY_SOCKET (a path, or an abstract name when it
// starts with '@'); a process not started by a service manager has no
// $NOTIFY_SOCKET and every call is a no-op. These few lines stand in for a
// dependency (coreos/go-systemd's daemon package is the same write).
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Notify sends state (e.g. "READY=1\nSTATUS=serving") to $NOTIFY_SOCKET. It
// reports whether a service manager was told: false, with a nil error, when
// $NOTIFY_SOCKET is unset.
func Notify(state string) (bool, error) {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return false, nil
	}
	if name[0] != '/' && name[0] != '@' {
		return false, fmt.Errorf("sdnotify: NOTIFY_SOCKET %q is neither a path nor an abstract name", name)
	}
	addr := &net.UnixAddr{Name: name, Net: "unixgram"}
	if name[0] == '@' {
		addr.Name = "\x00" + name[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, addr)
	if err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	return true, nil
}

// Ready says the process serves: systemd ends `systemctl start` of a
// Type=notify unit here.
func Ready(status string) error { return send("READY=1", status) }

// Reloading says the process begins to reload its configuration; Ready ends
// the reload. MONOTONIC_USEC is what Type=notify-reload units also require.
func Reloading(status string) error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("sdnotify: %w", err)
	}
	usec := ts.Nano() / int64(time.Microsecond)
	return send(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", usec), status)
}

// Stopping says the process begins to shut down.
func Stopping(status string) error { return send("STOPPING=1", status) }

// Status sets the one-line status `systemctl status` shows.
func Status(status string) error { return send("", status) }

func send(state, status string) error {
	var b strings.Builder
	b.WriteString(state)
	if status != "" {
		if b.Len() > 0 {
			b.WriteByte('\n')
		}
		// One line: a newline would start another assignment.
		b.WriteString("STATUS=" + strings.ReplaceAll(status, "\n", " "))
	}
	_, err := Notify(b.String())
	return err
}
