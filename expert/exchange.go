package expert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"golang.org/x/time/rate"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// chunk is how many bytes move between two deadline refreshes.
const chunk = 1 << 20

// ioTimeout bounds one header exchange and every chunk of a transfer.
const ioTimeout = 30 * time.Second

// ShardServer serves a store's blobs on /neuro/shard/1.0.0.
type ShardServer struct {
	h     host.Host
	store *Store
	log   *slog.Logger
}

// NewShardServer serves store's blobs on h once started.
func NewShardServer(h host.Host, store *Store, log *slog.Logger) *ShardServer {
	if log == nil {
		log = slog.Default()
	}
	return &ShardServer{h: h, store: store, log: log.With("component", "shard-server")}
}

// Start serves the protocol.
func (s *ShardServer) Start() { s.h.SetStreamHandler(neuropb.ShardProtocol, s.handle) }

// Close stops serving.
func (s *ShardServer) Close() error {
	s.h.RemoveStreamHandler(neuropb.ShardProtocol)
	return nil
}

func (s *ShardServer) handle(st network.Stream) {
	if err := st.Scope().SetService(neuropb.ShardService); err != nil {
		st.Reset()
		return
	}
	_ = st.SetDeadline(time.Now().Add(ioTimeout))
	w := wire.NewWriter(st, neuropb.MaxShardHeaderSize)
	var req neuropb.ShardRequest
	if err := wire.NewReader(st, neuropb.MaxShardHeaderSize).Read(&req); err != nil {
		st.Reset()
		return
	}
	refuse := func(format string, args ...any) {
		_ = w.Write(&neuropb.ShardResponse{Error: fmt.Sprintf(format, args...)})
		st.Close()
	}
	c, err := cid.Cast(req.GetCid())
	if err != nil {
		refuse("bad cid: %v", err)
		return
	}
	f, size, err := s.store.Open(c)
	if err != nil {
		refuse("%v", err)
		return
	}
	defer f.Close()
	if req.GetOffset() > uint64(size) {
		refuse("offset %d beyond the %d-byte blob", req.GetOffset(), size)
		return
	}
	if _, err := f.Seek(int64(req.GetOffset()), io.SeekStart); err != nil {
		refuse("seek: %v", err)
		return
	}
	if err := w.Write(&neuropb.ShardResponse{Size: uint64(size)}); err != nil {
		st.Reset()
		return
	}
	if err := copyChunks(st, f, size-int64(req.GetOffset()), st.SetWriteDeadline); err != nil {
		s.log.Debug("shard transfer", "cid", c, "peer", st.Conn().RemotePeer(), "err", err)
		st.Reset()
		return
	}
	st.Close()
}

// copyChunks copies n bytes, refreshing the deadline before every chunk so
// that a stalled peer ends the transfer but a slow one does not.
func copyChunks(dst io.Writer, src io.Reader, n int64, setDeadline func(time.Time) error) error {
	for n > 0 {
		_ = setDeadline(time.Now().Add(ioTimeout))
		m, err := io.CopyN(dst, src, min(n, chunk))
		n -= m
		if err != nil {
			return err
		}
	}
	return nil
}

// rateKey carries a fetch's bandwidth cap in its context.
type rateKey struct{}

// WithRateLimit caps the fetches made with ctx at bytesPerSecond each, so
// that a background transfer leaves the link (and the CPU that decrypts
// it) to interactive traffic. The reader slows, and flow control slows the
// sender.
func WithRateLimit(ctx context.Context, bytesPerSecond int) context.Context {
	return context.WithValue(ctx, rateKey{}, bytesPerSecond)
}

// rateWriter writes through a token bucket.
type rateWriter struct {
	ctx context.Context
	w   io.Writer
	lim *rate.Limiter
}

func (r *rateWriter) Write(b []byte) (int, error) {
	done := 0
	for done < len(b) {
		n := min(len(b)-done, r.lim.Burst())
		if err := r.lim.WaitN(r.ctx, n); err != nil {
			return done, err
		}
		m, err := r.w.Write(b[done : done+n])
		done += m
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// Progress is told how a fetch advances: bytes done of total.
type Progress func(c cid.Cid, done, total int64)

// Fetcher fetches blobs into a store from the peers that provide them.
type Fetcher struct {
	h        host.Host
	store    *Store
	log      *slog.Logger
	progress Progress
}

// NewFetcher fetches into store over h. progress may be nil.
func NewFetcher(h host.Host, store *Store, progress Progress, log *slog.Logger) *Fetcher {
	if log == nil {
		log = slog.Default()
	}
	return &Fetcher{h: h, store: store, progress: progress, log: log.With("component", "fetcher")}
}

// Fetch makes sure the store holds blob c, trying providers in order. An
// interrupted transfer is resumed from where it stopped (by the next
// provider, or the next call); content that does not hash to c is thrown
// away and the next provider tried.
func (f *Fetcher) Fetch(ctx context.Context, c cid.Cid, providers []peer.AddrInfo) error {
	if f.store.Has(c) {
		return nil
	}
	var errs []error
	for _, ai := range providers {
		if ai.ID == f.h.ID() {
			continue
		}
		if len(ai.Addrs) > 0 {
			f.h.Peerstore().AddAddrs(ai.ID, ai.Addrs, time.Hour)
		}
		err := f.fetchFrom(ctx, c, ai.ID)
		if err == nil {
			return nil
		}
		f.log.Info("fetch from provider failed", "cid", c, "peer", ai.ID, "err", err)
		errs = append(errs, fmt.Errorf("%s: %w", ai.ID, err))
		if ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 0 {
		return fmt.Errorf("fetch %s: no provider", c)
	}
	return fmt.Errorf("fetch %s: %w", c, errors.Join(errs...))
}

func (f *Fetcher) fetchFrom(ctx context.Context, c cid.Cid, p peer.ID) error {
	w, err := f.store.NewWriter(c)
	if err != nil {
		return err
	}
	defer w.Close()
	st, err := p2p.NewStream(ctx, f.h, p, neuropb.ShardProtocol)
	if err != nil {
		return err
	}
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(ioTimeout))
	if err := wire.NewWriter(st, neuropb.MaxShardHeaderSize).Write(&neuropb.ShardRequest{Cid: c.Bytes(), Offset: uint64(w.Offset())}); err != nil {
		st.Reset()
		return err
	}
	r := wire.NewReader(st, neuropb.MaxShardHeaderSize)
	var resp neuropb.ShardResponse
	if err := r.Read(&resp); err != nil {
		st.Reset()
		return err
	}
	if resp.GetError() != "" {
		return fmt.Errorf("provider: %s", resp.GetError())
	}
	total := int64(resp.GetSize())
	if total > neuropb.MaxBlobSize || total < w.Offset() {
		st.Reset()
		return fmt.Errorf("provider announces %d bytes (have %d, limit %d)", total, w.Offset(), int64(neuropb.MaxBlobSize))
	}
	_ = st.SetDeadline(time.Time{})
	dst := io.Writer(w)
	if f.progress != nil {
		dst = &progressWriter{w: w, c: c, done: w.Offset(), total: total, fn: f.progress}
	}
	if bps, _ := ctx.Value(rateKey{}).(int); bps > 0 {
		dst = &rateWriter{ctx: ctx, w: dst, lim: rate.NewLimiter(rate.Limit(bps), min(bps, 64<<10))}
	}
	if err := copyChunks(dst, r.Raw(), total-w.Offset(), st.SetReadDeadline); err != nil {
		st.Reset()
		return fmt.Errorf("transfer stopped at %d of %d bytes (kept for resuming): %w", w.Offset(), total, err)
	}
	return w.Commit()
}

type progressWriter struct {
	w           io.Writer
	c           cid.Cid
	done, total int64
	fn          Progress
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.done += int64(n)
	p.fn(p.c, p.done, p.total)
	return n, err
}
