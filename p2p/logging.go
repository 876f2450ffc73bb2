package p2p

import (
	"context"
	"log/slog"
	"strings"
)

// demoteHandler lowers to DEBUG the library log records that report an
// expected, self-healing condition as a warning. GossipSub's DHT discovery
// warns "error providing rendezvous for topic ... failed to find any peer
// in table" whenever it advertises a topic before the routing table has a
// peer, which is the case at every node's start; it retries on its own.
// Its tag tracer warns "error bumping delivery tag" for a message
// delivered while the connection manager's queue of tag updates is full
// (a busy node) or before the topic's tag exists: the update is dropped,
// which only shades which connections the manager keeps.
type demoteHandler struct {
	slog.Handler
	prefixes []string
}

func (h demoteHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level > slog.LevelDebug {
		for _, p := range h.prefixes {
			if strings.HasPrefix(r.Message, p) {
				if !h.Handler.Enabled(ctx, slog.LevelDebug) {
					return nil
				}
				r.Level = slog.LevelDebug
				break
			}
		}
	}
	return h.Handler.Handle(ctx, r)
}

func (h demoteHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return demoteHandler{h.Handler.WithAttrs(as), h.prefixes}
}

func (h demoteHandler) WithGroup(name string) slog.Handler {
	return demoteHandler{h.Handler.WithGroup(name), h.prefixes}
}

// pubsubLogger is the logger handed to GossipSub.
func pubsubLogger(log *slog.Logger) *slog.Logger {
	return slog.New(demoteHandler{
		Handler:  log.With("component", "gossipsub").Handler(),
		prefixes: []string{"bootstrap: error providing rendezvous", "error bumping delivery tag"},
	})
}
