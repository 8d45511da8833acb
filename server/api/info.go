package api

import (
	"context"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-id/ferry/internal/logging"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// CountAgents counts attested agents (banned ones included, as they are
// listed).
func (a *Admin) CountAgents(ctx context.Context, req *ferrypb.CountAgentsRequest) (*ferrypb.CountAgentsResponse, error) {
	if err := a.read(ctx, req.Consistency); err != nil {
		return nil, err
	}
	return &ferrypb.CountAgentsResponse{Count: int64(len(a.cfg.Store.View().Nodes()))}, nil
}

// CountBundles counts the trust bundles the server holds, ours included.
func (a *Admin) CountBundles(ctx context.Context, req *ferrypb.CountBundlesRequest) (*ferrypb.CountBundlesResponse, error) {
	if err := a.read(ctx, req.Consistency); err != nil {
		return nil, err
	}
	return &ferrypb.CountBundlesResponse{Count: int64(len(a.cfg.Store.View().Bundles()))}, nil
}

// GetServerInfo describes this node: what Config.Info says (build, cluster
// role, readiness) and the size of its state.
func (a *Admin) GetServerInfo(context.Context, *ferrypb.GetServerInfoRequest) (*ferrypb.ServerInfo, error) {
	info := &ferrypb.ServerInfo{}
	if a.cfg.Info != nil {
		info = proto.Clone(a.cfg.Info()).(*ferrypb.ServerInfo)
	}
	if info.TrustDomain == "" && !a.cfg.TrustDomain.IsZero() {
		info.TrustDomain = a.cfg.TrustDomain.Name()
	}
	v := a.cfg.Store.View()
	info.Agents = int64(len(v.Nodes()))
	info.Entries = int64(v.CountEntries())
	info.Bundles = int64(len(v.Bundles()))
	return info, nil
}

func (a *Admin) logLevel() (*logging.Level, error) {
	if a.cfg.LogLevel == nil {
		return nil, status.Error(codes.FailedPrecondition, "this server's log level cannot be changed while it runs (its logger was given to it)")
	}
	return a.cfg.LogLevel, nil
}

func loggerOf(l *logging.Level) *ferrypb.Logger {
	return &ferrypb.Logger{CurrentLevel: logging.LevelName(l.Get()), LaunchLevel: logging.LevelName(l.Launch())}
}

// GetLogger returns this node's log level.
func (a *Admin) GetLogger(context.Context, *ferrypb.GetLoggerRequest) (*ferrypb.Logger, error) {
	l, err := a.logLevel()
	if err != nil {
		return nil, err
	}
	return loggerOf(l), nil
}

// SetLogLevel changes this node's log level until it restarts or is reset.
func (a *Admin) SetLogLevel(_ context.Context, req *ferrypb.SetLogLevelRequest) (*ferrypb.Logger, error) {
	l, err := a.logLevel()
	if err != nil {
		return nil, err
	}
	if req.Level == "" {
		return nil, status.Error(codes.InvalidArgument, "level is required (debug, info, warn or error)")
	}
	lv, err := logging.ParseLevel(req.Level)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	a.setLevel(l, lv, "log level changed")
	return loggerOf(l), nil
}

// ResetLogLevel sets this node's log level back to the one it started with.
func (a *Admin) ResetLogLevel(context.Context, *ferrypb.ResetLogLevelRequest) (*ferrypb.Logger, error) {
	l, err := a.logLevel()
	if err != nil {
		return nil, err
	}
	a.setLevel(l, l.Launch(), "log level reset")
	return loggerOf(l), nil
}

// setLevel changes the level and logs the change under the more verbose of
// the two levels (before raising it, after lowering it).
func (a *Admin) setLevel(l *logging.Level, lv slog.Level, msg string) {
	old := l.Get()
	if lv < old {
		l.Set(lv)
	}
	a.log.Warn(msg, "from", logging.LevelName(old), "to", logging.LevelName(lv))
	l.Set(lv)
}
