package expert

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/time/rate"

	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/p2ptest"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

func openStore(t *testing.T) *Store {
	t.Helper()
	s, err := OpenStore(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Import a model on one node, provide it in the DHT, and fetch every blob
// on another node that knows only the model CID.
func TestFetchThroughDHT(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	hs := p2ptest.Cluster(t, ctx, 3, p2ptest.Config(time.Second))
	mc, m, dir := tinyShards(t, model.Q8_0)
	src, dst := hs[0], hs[2]
	srcStore := openStore(t)
	if got, err := srcStore.ImportSplit(dir); err != nil || !got.Equals(mc) {
		t.Fatalf("import: %v %v", got, err)
	}
	srv := NewShardServer(src.LibP2P(), srcStore, quiet())
	srv.Start()
	defer srv.Close()
	blobs := []cid.Cid{mc}
	for _, ref := range model.ShardRefs(m) {
		bc, _ := cid.Cast(ref.GetCid())
		blobs = append(blobs, bc)
	}
	for _, b := range blobs {
		if err := src.Provide(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	dstStore := openStore(t)
	var progressed atomic.Int64
	f := NewFetcher(dst.LibP2P(), dstStore, func(_ cid.Cid, done, total int64) {
		if done > total {
			t.Errorf("progress %d of %d", done, total)
		}
		progressed.Add(1)
	}, quiet())
	for _, b := range blobs {
		provs, err := dst.FindProviders(ctx, b, 3, 20*time.Second)
		if err != nil || len(provs) == 0 {
			t.Fatalf("providers of %s: %v %v", b, provs, err)
		}
		if err := f.Fetch(ctx, b, provs); err != nil {
			t.Fatal(err)
		}
	}
	// What arrived is exactly what was split.
	got, err := dstStore.Manifest(mc)
	if err != nil || len(got.GetExperts()) != len(m.GetExperts()) {
		t.Fatalf("manifest: %v", err)
	}
	for _, ref := range model.ShardRefs(m) {
		bc, _ := cid.Cast(ref.GetCid())
		want, _ := os.ReadFile(model.ShardPath(dir, bc))
		have, err := dstStore.ReadAll(bc, 1<<30)
		if err != nil || !bytes.Equal(want, have) {
			t.Fatalf("shard %s differs: %v", bc, err)
		}
		if _, err := dstStore.OpenShard(ref); err != nil {
			t.Fatal(err)
		}
	}
	if progressed.Load() == 0 {
		t.Error("no progress reported")
	}
}

func threeHosts(t *testing.T) [3]host.Host {
	t.Helper()
	var hs [3]host.Host
	for i := range hs {
		h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		hs[i] = h
	}
	return hs
}

func info(h host.Host) peer.AddrInfo { return peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()} }

// A provider serving a shard with a flipped byte is caught by the fetcher,
// which gets the shard from the next provider.
func TestCorruptProviderFallsBack(t *testing.T) {
	_, m, dir := tinyShards(t, model.F32)
	hs := threeHosts(t)
	bad, good := openStore(t), openStore(t)
	for _, s := range []*Store{bad, good} {
		if _, err := s.ImportSplit(dir); err != nil {
			t.Fatal(err)
		}
	}
	ref := m.GetExperts()[3].GetShard()
	bc, _ := cid.Cast(ref.GetCid())
	raw, _ := os.ReadFile(bad.path(bc))
	raw[len(raw)/2] ^= 0x40
	// A file of its own: the import linked the split's into both stores.
	tmp := bad.path(bc) + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, bad.path(bc)); err != nil {
		t.Fatal(err)
	}
	for i, s := range []*Store{bad, good} {
		srv := NewShardServer(hs[i], s, quiet())
		srv.Start()
		defer srv.Close()
	}
	dst := openStore(t)
	f := NewFetcher(hs[2], dst, nil, quiet())
	// The corrupt provider alone: refused.
	err := f.Fetch(t.Context(), bc, []peer.AddrInfo{info(hs[0])})
	if !errors.Is(err, model.ErrCIDMismatch) || dst.Has(bc) {
		t.Fatalf("corrupt provider alone: %v", err)
	}
	// Corrupt first, good second: the good copy lands.
	if err := f.Fetch(t.Context(), bc, []peer.AddrInfo{info(hs[0]), info(hs[1])}); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.OpenShard(ref); err != nil {
		t.Fatal(err)
	}
}

// An interrupted transfer is resumed: the next provider is asked for the
// rest only.
func TestResumeAfterInterruptedTransfer(t *testing.T) {
	_, m, dir := tinyShards(t, model.F32)
	hs := threeHosts(t)
	good := openStore(t)
	if _, err := good.ImportSplit(dir); err != nil {
		t.Fatal(err)
	}
	ref := m.GetGating()
	bc, _ := cid.Cast(ref.GetCid())
	raw, err := good.ReadAll(bc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	half := len(raw) / 2
	// The fetcher reports when it has written the first half to its store.
	gotHalf := make(chan struct{})
	var once sync.Once
	progress := func(_ cid.Cid, done, _ int64) {
		if done >= int64(half) {
			once.Do(func() { close(gotHalf) })
		}
	}
	// hs[0] sends half the blob, then cuts the stream once the fetcher has
	// it (or after 30 s, which fails the test below).
	hs[0].SetStreamHandler(neuropb.ShardProtocol, func(st network.Stream) {
		var req neuropb.ShardRequest
		if err := wire.NewReader(st, neuropb.MaxShardHeaderSize).Read(&req); err != nil {
			st.Reset()
			return
		}
		wire.NewWriter(st, neuropb.MaxShardHeaderSize).Write(&neuropb.ShardResponse{Size: uint64(len(raw))})
		st.Write(raw[:half])
		select {
		case <-gotHalf:
		case <-time.After(30 * time.Second):
		}
		st.Reset()
	})
	// hs[1] serves the real blob and records the offset it was asked for.
	srv := NewShardServer(hs[1], good, quiet())
	var asked atomic.Int64
	asked.Store(-1)
	hs[1].SetStreamHandler(neuropb.ShardProtocol, func(st network.Stream) {
		rec := &recordingStream{Stream: st}
		srv.handle(rec)
		asked.Store(rec.offset)
	})
	dst := openStore(t)
	f := NewFetcher(hs[2], dst, progress, quiet())
	if err := f.Fetch(t.Context(), bc, []peer.AddrInfo{info(hs[0])}); err == nil {
		t.Fatal("the cut transfer succeeded")
	}
	w, err := dst.NewWriter(bc)
	if err != nil {
		t.Fatal(err)
	}
	kept := w.Offset()
	w.Close()
	if kept != int64(half) {
		t.Fatalf("kept %d bytes of the cut transfer, want %d", kept, half)
	}
	if err := f.Fetch(t.Context(), bc, []peer.AddrInfo{info(hs[1])}); err != nil {
		t.Fatal(err)
	}
	if asked.Load() != int64(half) {
		t.Fatalf("second provider asked from offset %d, want %d", asked.Load(), half)
	}
	if have, err := dst.ReadAll(bc, 1<<30); err != nil || !bytes.Equal(have, raw) {
		t.Fatalf("resumed blob differs: %v", err)
	}
}

// recordingStream notes the offset of the ShardRequest read through it.
type recordingStream struct {
	network.Stream
	buf    bytes.Buffer
	offset int64
	parsed bool
}

func (r *recordingStream) Read(p []byte) (int, error) {
	n, err := r.Stream.Read(p)
	if !r.parsed {
		r.buf.Write(p[:n])
		var req neuropb.ShardRequest
		if wire.NewReader(bytes.NewReader(r.buf.Bytes()), neuropb.MaxShardHeaderSize).Read(&req) == nil {
			r.offset, r.parsed = int64(req.GetOffset()), true
		}
	}
	return n, err
}

// A capped fetch writes every byte, in order, and no faster than its cap
// allows after the first bucketful (a lower bound: a busy machine only
// slows it).
func TestRateWriterCaps(t *testing.T) {
	const bps, size = 128 << 10, 256 << 10
	src := make([]byte, size)
	for i := range src {
		src[i] = byte(i * 7)
	}
	var dst bytes.Buffer
	ctx := WithRateLimit(t.Context(), bps)
	w := &rateWriter{ctx: ctx, w: &dst, lim: rate.NewLimiter(rate.Limit(bps), min(bps, 64<<10))}
	start := time.Now()
	for off := 0; off < size; off += 100 << 10 { // writes larger than the bucket are split
		if _, err := w.Write(src[off:min(off+100<<10, size)]); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	if !bytes.Equal(dst.Bytes(), src) {
		t.Fatal("bytes differ")
	}
	if floor := time.Duration(float64(size-64<<10) / bps * float64(time.Second) * 0.9); took < floor {
		t.Fatalf("256 KiB at 128 KiB/s in %v, faster than the cap allows (%v)", took, floor)
	}
	if v, _ := ctx.Value(rateKey{}).(int); v != bps {
		t.Fatalf("context carries %d", v)
	}
}
