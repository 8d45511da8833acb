package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ferry-id/ferry/internal/logging"
	"github.com/ferry-id/ferry/internal/sdnotify"
)

// service is what `ferry server|agent|bridge run` hands to runService.
type service struct {
	role string
	log  *slog.Logger
	// level is the running logger's level (also `ferry logger` on a
	// server); reload sets it.
	level *logging.Level
	// run serves until its context ends.
	run func(context.Context) error
	// ready is closed when the role serves (what its /ready reports).
	ready <-chan struct{}
	// reloadLevel re-reads the config file and returns its log_level.
	reloadLevel func() (string, error)
}

// runService runs a role as a service manager expects (sd_notify(3); every
// call is a no-op without $NOTIFY_SOCKET):
//   - READY=1 once the role serves;
//   - SIGTERM or SIGINT: STOPPING=1, then a graceful stop; exit status 0;
//   - SIGHUP: RELOADING=1, the config file is read again and its log_level
//     applied, READY=1. Everything else in the file (addresses, paths, keys,
//     attestors, the cluster) takes effect at the next start: a reload that
//     cannot apply a setting safely leaves it alone and says so in the log.
func runService(parent context.Context, s service) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)

	done := make(chan error, 1)
	go func() { done <- s.run(ctx) }()
	ready := s.ready
	for {
		select {
		case <-ready:
			ready = nil
			s.notify(sdnotify.Ready(s.role + " serving"))
			s.log.Info("ready", "role", s.role)
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				s.reload()
				continue
			}
			s.notify(sdnotify.Stopping(s.role + " stopping"))
			s.log.Info("stopping", "signal", sig.String())
			cancel()
			// A second signal while draining is not a reason to hurry:
			// the service manager's TimeoutStopSec= ends with SIGKILL.
		case err := <-done:
			if err != nil && ctx.Err() == nil {
				s.notify(sdnotify.Status(s.role + " failed: " + err.Error()))
			}
			return err
		}
	}
}

func (s service) reload() {
	s.notify(sdnotify.Reloading(s.role + " reloading"))
	status := s.role + " serving"
	if err := s.applyReload(); err != nil {
		s.log.Error("reload failed; the running configuration is unchanged", "error", err)
		status += " (last reload failed: " + err.Error() + ")"
	}
	s.notify(sdnotify.Ready(status))
}

func (s service) applyReload() error {
	level, err := s.reloadLevel()
	if err != nil {
		return err
	}
	lv, err := logging.ParseLevel(level)
	if err != nil {
		return err
	}
	// The file's level becomes the launch level too: `ferry logger reset`
	// goes back to it.
	old := s.level.Get()
	s.level.Relaunch(lv)
	if old != lv {
		s.log.Info("log level changed", "from", old.String(), "to", lv.String())
	}
	s.log.Info("configuration reloaded: log_level applied; other settings take effect at the next start")
	return nil
}

func (s service) notify(err error) {
	if err != nil {
		s.log.Warn("telling the service manager", "error", fmt.Sprint(err))
	}
}
