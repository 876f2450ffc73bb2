// Package verdict is a node's part in the network's verdicts: it signs
// and publishes, on the validation topic, the verdicts its gating node
// reaches (a result re-executed elsewhere and found wrong), reports them
// to the ledger for slashing, and judges the verdicts other nodes publish:
// a node that serves the expert re-runs the task and marks down the
// accused (confirmed) or the judge (a false accusation) in its
// reputation book.
//
// Service follows the lifecycle every long-lived service of neuro
// follows: New takes every dependency and starts nothing, Start starts
// the goroutines, Close ends them and returns once they have.
package verdict

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/reputation"
)

// Network is what the service uses of the p2p stack (*p2p.Host).
type Network interface {
	ID() peer.ID
	PubSub() *pubsub.PubSub
	Rejections() *p2p.Rejections
}

var _ Network = (*p2p.Host)(nil)

// Slasher sends a ledger transaction (ledger.Service.Send).
type Slasher interface {
	Send(ctx context.Context, body func(*neuropb.LedgerTx)) (*neuropb.LedgerTx, error)
}

// Config gives the service what it needs besides the network.
type Config struct {
	// Key signs the node's verdicts (the node's identity).
	Key crypto.PrivKey
	// Book is the node's reputation book.
	Book *reputation.Book
	// Rerun, if set, re-runs a task on this node (an expert node that
	// serves the expert); without it received verdicts are unchecked.
	Rerun func(reputation.Task) ([]float32, error)
	// Slasher, if set, is told of each verdict this node publishes.
	Slasher Slasher
}

// Wrong is a result a gating node found wrong: the task, the accused's
// output and the reference that two agreeing peers computed.
type Wrong struct {
	Task     reputation.Task
	Accused  peer.ID
	Output   []float32
	Agreeing [2]peer.ID
	Right    []float32
	// Receipt is the accused's signed receipt for its output, when it
	// sent one.
	Receipt *neuropb.UsageReceipt
}

// Status counts verdicts.
type Status struct {
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
	// Pending counts the verdicts queued or being published and reported.
	Pending int64 `json:"pending"`
}

// maxQueued bounds the verdicts waiting to be published; beyond it a new
// one is dropped (and logged): a gating node that finds that many wrong
// results at once has excluded their authors already.
const maxQueued = 256

// Service publishes and judges verdicts.
type Service struct {
	net   Network
	cfg   Config
	log   *slog.Logger
	topic *p2p.Topic[*neuropb.Verdict]

	queue chan Wrong

	published, tooLarge, dropped  atomic.Int64
	confirmed, refuted, unchecked atomic.Int64
	undecided, rejected           atomic.Int64
	slashes, pending              atomic.Int64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

// New joins the validation topic (its validator refuses verdicts that do
// not verify). It starts nothing.
func New(n Network, cfg Config, log *slog.Logger) (*Service, error) {
	if cfg.Key == nil || cfg.Book == nil {
		return nil, errors.New("verdicts: a key and a reputation book are required")
	}
	if log == nil {
		log = slog.Default()
	}
	s := &Service{net: n, cfg: cfg, log: log.With("component", "verdicts"), queue: make(chan Wrong, maxQueued)}
	t, err := p2p.JoinTopic(n.PubSub(), neuropb.TopicValidation, neuropb.MaxVerdictSize,
		func() *neuropb.Verdict { return new(neuropb.Verdict) }, s.validate, n.Rejections())
	if err != nil {
		return nil, fmt.Errorf("validation topic: %w", err)
	}
	s.topic = t
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Start publishes the verdicts reported and judges the ones received,
// until Close; ctx is not kept.
func (s *Service) Start(context.Context) error {
	sub, err := s.topic.Subscribe()
	if err != nil {
		return fmt.Errorf("subscribe to verdicts: %w", err)
	}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		defer sub.Cancel()
		s.receive(sub)
	}()
	go func() {
		defer s.wg.Done()
		for {
			select {
			case <-s.ctx.Done():
				return
			case w := <-s.queue:
				s.publish(w)
				s.pending.Add(-1)
			}
		}
	}()
	return nil
}

// Close stops publishing and judging; it returns once the service's
// goroutines have ended and is safe to call more than once. Verdicts still
// queued are dropped.
func (s *Service) Close() error {
	s.once.Do(func() {
		s.cancel()
		s.wg.Wait()
	})
	return nil
}

// Report queues a verdict for publishing. It never blocks.
func (s *Service) Report(w Wrong) {
	s.pending.Add(1)
	select {
	case s.queue <- w:
	default:
		s.pending.Add(-1)
		s.dropped.Add(1)
		s.log.Warn("verdict dropped: too many queued", "accused", w.Accused)
	}
}

// Status returns the counts.
func (s *Service) Status() Status {
	return Status{Published: s.published.Load(), Confirmed: s.confirmed.Load(), Refuted: s.refuted.Load(),
		Undecided: s.undecided.Load(), Unchecked: s.unchecked.Load(), Rejected: s.rejected.Load(), Slashes: s.slashes.Load(),
		Pending: s.pending.Load()}
}

// validate is the topic validator: a verdict must verify and be published
// by its judge. A forged one lowers its publisher's correctness.
func (s *Service) validate(_ context.Context, author peer.ID, v *neuropb.Verdict) error {
	if _, _, _, _, err := reputation.VerifyVerdict(v); err != nil {
		s.rejected.Add(1)
		if author != s.net.ID() {
			s.cfg.Book.Refuted(author)
		}
		return err
	}
	if judge, _ := peer.IDFromBytes(v.GetJudge()); judge != author {
		s.rejected.Add(1)
		return fmt.Errorf("%w: verdict judged by %s, published by %s", neuropb.ErrInvalid, judge, author)
	}
	return nil
}

// publish signs and publishes a verdict, and reports it to the ledger.
func (s *Service) publish(w Wrong) {
	v, err := reputation.NewVerdict(s.cfg.Key, w.Task, w.Accused, w.Output, w.Agreeing, w.Right, w.Receipt, time.Now())
	if errors.Is(err, reputation.ErrVerdictTooLarge) {
		s.tooLarge.Add(1)
		return
	}
	if err != nil {
		s.log.Warn("verdict", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	defer cancel()
	if err := s.topic.Publish(ctx, v); err != nil {
		s.log.Warn("publish verdict", "err", err)
		return
	}
	s.published.Add(1)
	// The judge also reports the verdict to the ledger, which slashes the
	// liar's stake when the judge is staked. (Other nodes re-run the
	// verdict and adjust their own books; a refuted judge loses their
	// trust, but a dispute on the chain is not built yet.)
	if s.cfg.Slasher != nil {
		if _, err := s.cfg.Slasher.Send(ctx, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Slash{Slash: &neuropb.Slash{Verdict: v}}
		}); err != nil {
			s.log.Warn("report verdict for slashing", "accused", w.Accused, "err", err)
		} else {
			s.slashes.Add(1)
		}
	}
	s.log.Info("published verdict", "accused", w.Accused, "task", taskName(w.Task))
}

// receive judges the verdicts of other nodes until the service closes.
func (s *Service) receive(sub *p2p.Subscription[*neuropb.Verdict]) {
	for {
		m, err := sub.Next(s.ctx)
		if err != nil {
			return
		}
		if m.Author == s.net.ID() {
			continue
		}
		t, accused, wrong, right, err := reputation.VerifyVerdict(m.Msg)
		if err != nil {
			continue // the validator has already refused it
		}
		o := s.cfg.Book.Judge(m.Msg, t, accused, wrong, right, s.cfg.Rerun)
		switch o {
		case reputation.Confirmed:
			s.confirmed.Add(1)
		case reputation.Refuted:
			s.refuted.Add(1)
		case reputation.Undecided:
			s.undecided.Add(1)
		default:
			s.unchecked.Add(1)
		}
		s.log.Info("verdict received", "judge", m.Author, "accused", accused, "task", taskName(t), "outcome", o.String())
	}
}

// taskName names a verdict's task in logs: "expert 3:5", or "layers 0-11"
// for a span request.
func taskName(t reputation.Task) string {
	if t.Span != nil {
		return fmt.Sprintf("layers %d-%d", t.Layer, t.Span.End-1)
	}
	return fmt.Sprintf("expert %d:%d", t.Layer, t.Expert)
}
