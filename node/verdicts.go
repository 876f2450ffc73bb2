package node

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/gating"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/reputation"
)

// verdicts publishes the gating node's verdicts on the validation topic
// and judges the ones other nodes publish: a node that serves the expert
// re-runs the task and marks down the accused (confirmed) or the judge (a
// false accusation).
type verdicts struct {
	n     *Node
	topic *p2p.Topic[*neuropb.Verdict]

	published, tooLarge           atomic.Int64
	confirmed, refuted, unchecked atomic.Int64
	undecided, rejected           atomic.Int64
	slashes                       atomic.Int64
}

// VerdictStatus counts verdicts.
type VerdictStatus struct {
	Published int64 `json:"published"`
	// Received, by what re-running the task showed.
	Confirmed int64 `json:"confirmed"`
	Refuted   int64 `json:"refuted"`
	Undecided int64 `json:"undecided"`
	Unchecked int64 `json:"unchecked"`
	// Rejected verdicts failed verification (signature, digests, fields).
	Rejected int64 `json:"rejected"`
	// Slashes counts the verdicts this node (a judge) reported to the
	// ledger.
	Slashes int64 `json:"slashes"`
}

func (vd *verdicts) status() *VerdictStatus {
	return &VerdictStatus{Published: vd.published.Load(), Confirmed: vd.confirmed.Load(), Refuted: vd.refuted.Load(),
		Undecided: vd.undecided.Load(), Unchecked: vd.unchecked.Load(), Rejected: vd.rejected.Load(), Slashes: vd.slashes.Load()}
}

func newVerdicts(n *Node) (*verdicts, error) {
	vd := &verdicts{n: n}
	t, err := p2p.JoinTopic(n.p2p.PubSub(), neuropb.TopicValidation, neuropb.MaxVerdictSize,
		func() *neuropb.Verdict { return new(neuropb.Verdict) }, vd.validate, n.p2p.Rejections())
	if err != nil {
		return nil, fmt.Errorf("validation topic: %w", err)
	}
	vd.topic = t
	return vd, nil
}

// validate is the topic validator: a verdict must verify and be published
// by its judge. A forged one lowers its publisher's correctness.
func (vd *verdicts) validate(_ context.Context, author peer.ID, v *neuropb.Verdict) error {
	if _, _, _, _, err := reputation.VerifyVerdict(v); err != nil {
		vd.rejected.Add(1)
		if author != vd.n.p2p.ID() {
			vd.n.book.Refuted(author)
		}
		return err
	}
	if judge, _ := peer.IDFromBytes(v.GetJudge()); judge != author {
		vd.rejected.Add(1)
		return fmt.Errorf("%w: verdict judged by %s, published by %s", neuropb.ErrInvalid, judge, author)
	}
	return nil
}

// publish signs and publishes a verdict the gating node reached.
func (vd *verdicts) publish(ctx context.Context, w gating.Verdict) {
	key := vd.n.p2p.LibP2P().Peerstore().PrivKey(vd.n.p2p.ID())
	v, err := reputation.NewVerdict(key, reputation.Task{Model: w.Model, Layer: w.Key.Layer, Expert: w.Key.Expert, Input: w.Input, N: w.N},
		w.Accused, w.Wrong, w.Agreeing, w.Right, w.Receipt, time.Now())
	if errors.Is(err, reputation.ErrVerdictTooLarge) {
		vd.tooLarge.Add(1)
		return
	}
	if err != nil {
		vd.n.log.Warn("verdict", "err", err)
		return
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := vd.topic.Publish(pctx, v); err != nil {
		vd.n.log.Warn("publish verdict", "err", err)
		return
	}
	vd.published.Add(1)
	// The judge also reports the verdict to the ledger, which slashes the
	// liar's stake when the judge is staked. (Other nodes re-run the
	// verdict and adjust their own books; a refuted judge loses their
	// trust, but a dispute on the chain is not built yet.)
	if vd.n.ledger != nil {
		if _, err := vd.n.ledger.Send(pctx, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Slash{Slash: &neuropb.Slash{Verdict: v}}
		}); err != nil {
			vd.n.log.Warn("report verdict for slashing", "accused", w.Accused, "err", err)
		} else {
			vd.slashes.Add(1)
		}
	}
	vd.n.log.Info("published verdict", "accused", w.Accused, "expert", w.Key.String())
}

// receive judges the verdicts of other nodes until ctx ends.
func (vd *verdicts) receive(ctx context.Context) {
	sub, err := vd.topic.Subscribe()
	if err != nil {
		vd.n.log.Error("subscribe to verdicts", "err", err)
		return
	}
	for {
		m, err := sub.Next(ctx)
		if err != nil {
			return
		}
		if m.Author == vd.n.p2p.ID() {
			continue
		}
		t, accused, wrong, right, err := reputation.VerifyVerdict(m.Msg)
		if err != nil {
			continue // the validator has already refused it
		}
		var rerun func(reputation.Task) ([]float32, error)
		if svc := vd.n.expert; svc != nil {
			rerun = func(t reputation.Task) ([]float32, error) {
				return svc.Compute(t.Model, t.Layer, t.Expert, t.Input, t.N)
			}
		}
		o := vd.n.book.Judge(m.Msg, t, accused, wrong, right, rerun)
		switch o {
		case reputation.Confirmed:
			vd.confirmed.Add(1)
		case reputation.Refuted:
			vd.refuted.Add(1)
		case reputation.Undecided:
			vd.undecided.Add(1)
		default:
			vd.unchecked.Add(1)
		}
		vd.n.log.Info("verdict received", "judge", m.Author, "accused", accused, "expert", fmt.Sprintf("%d:%d", t.Layer, t.Expert), "outcome", o.String())
	}
}
