// Package gating is the gating node: it runs embeddings, attention and the
// router itself (ggml.Gating) and sends each MoE layer's hidden states to
// the experts on other nodes, combining their answers. Today it holds the
// network side of the experts hook; selection by latency and reputation,
// hedging, the inference protocol and the HTTP API follow (issue 5).
package gating

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/ggml"
	"github.com/neuro-p2p/neuro/p2p"
	neuropb "github.com/neuro-p2p/neuro/proto"
)

// ErrNoProvider means no live node hosts an expert a token needs.
var ErrNoProvider = errors.New("no live provider")

// FindProviders lists the peers that host an expert, best first.
type FindProviders func(k expert.Key) []peer.ID

// HeartbeatProviders finds providers in the routing topic's heartbeats:
// the peers whose last heartbeat lists the expert.
func HeartbeatProviders(h *p2p.Host, model cid.Cid) FindProviders {
	want := string(model.Bytes())
	return func(k expert.Key) []peer.ID {
		packed := uint32(k.Layer)<<16 | uint32(k.Expert)
		var out []peer.ID
		for _, e := range h.Peers().Snapshot(time.Now()) {
			for _, hm := range e.Hosted {
				if string(hm.GetModel()) != want {
					continue
				}
				for _, x := range hm.GetExperts() {
					if x == packed {
						out = append(out, e.ID)
					}
				}
			}
		}
		return out
	}
}

// RemoteExperts answers the gating compute's MoE calls with experts on
// other nodes. For each expert a layer needs it sends the batch of tokens
// routed to it in one request, all experts in parallel; a failed call goes
// at once to the next provider. The outputs are combined exactly as
// llama.cpp combines them (ggml.Combine).
type RemoteExperts struct {
	Client    *expert.Client
	Model     cid.Cid
	Embd      int
	Used      int
	Providers FindProviders
	// DType on the wire: F32 keeps the arithmetic identical to llama.cpp;
	// F16 halves the bytes.
	DType neuropb.WireDType
	// CallTimeout bounds one expert call (default 30 s).
	CallTimeout time.Duration
}

var _ ggml.Experts = (*RemoteExperts)(nil)

// MoE implements ggml.Experts.
func (r *RemoteExperts) MoE(ctx context.Context, layer int, x []float32, n int, selected []int32, weights []float32) ([]float32, error) {
	outs := make([]float32, n*r.Used*r.Embd)
	routing := ggml.Route(selected)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, e := range routing.Experts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			slots := routing.Slots[e]
			out, err := r.call(ctx, expert.Key{Layer: layer, Expert: int(e)}, ggml.Gather(x, slots, r.Used, r.Embd), len(slots))
			if err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
				return
			}
			ggml.Scatter(outs, out, slots, r.Embd)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return ggml.Combine(outs, weights, n, r.Used, r.Embd), nil
}

// call asks the providers of k in turn until one answers.
func (r *RemoteExperts) call(ctx context.Context, k expert.Key, in []float32, n int) ([]float32, error) {
	timeout := r.CallTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	providers := r.Providers(k)
	var errs []error
	for _, p := range providers {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		resp, err := r.Client.Call(cctx, p, expert.Request{Model: r.Model, Layer: k.Layer, Expert: k.Expert,
			Hidden: in, N: n, DType: r.DType})
		cancel()
		if err == nil {
			return resp.Output, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", p, err))
		if ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("expert %s: %w (no node announces it)", k, ErrNoProvider)
	}
	return nil, fmt.Errorf("expert %s: %w: every provider failed: %w", k, ErrNoProvider, errors.Join(errs...))
}
