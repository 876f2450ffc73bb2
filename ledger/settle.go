package ledger

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/neuro-p2p/neuro/neuropb"
)

// Sender signs and submits a transaction (Service.Send).
type Sender interface {
	Send(ctx context.Context, body func(*neuropb.LedgerTx)) (*neuropb.LedgerTx, error)
}

var _ Sender = (*Service)(nil)

// SettlerConfig configures a Settler.
type SettlerConfig struct {
	// OnSettled, if set, is told of each batch of receipts settled.
	OnSettled func(escrow uint64, receipts []*neuropb.UsageReceipt)
	// Timeout bounds settling one generation's receipts (default 1 min).
	Timeout time.Duration
	// Drain is how long Close waits for the receipts still queued
	// (default 5 s); what is left then is logged and dropped (the escrow
	// refunds the user at expiry).
	Drain time.Duration
}

// Settler pays expert nodes for a gating node's generations: it takes
// the signed usage receipts of each paid generation (Submit, which never
// blocks) and sends one settle transaction per neuropb.MaxReceipts of
// them, in the order they came, from a goroutine of its own.
type Settler struct {
	send Sender
	cfg  SettlerConfig
	log  *slog.Logger

	mu      sync.Mutex
	queue   []settleJob
	wake    chan struct{}
	closing chan struct{}

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

type settleJob struct {
	escrow   uint64
	receipts []*neuropb.UsageReceipt
	// close ends the escrow with the job's last transaction.
	close bool
}

// NewSettler makes a settler that sends with s. It starts nothing.
func NewSettler(s Sender, cfg SettlerConfig, log *slog.Logger) (*Settler, error) {
	if s == nil {
		return nil, errors.New("settler: no sender")
	}
	if log == nil {
		log = slog.Default()
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Minute
	}
	if cfg.Drain <= 0 {
		cfg.Drain = 5 * time.Second
	}
	st := &Settler{send: s, cfg: cfg, log: log.With("component", "settler"), wake: make(chan struct{}, 1),
		closing: make(chan struct{})}
	st.ctx, st.cancel = context.WithCancel(context.Background())
	return st, nil
}

// Start starts the goroutine that settles. It runs until Close; ctx is not
// kept.
func (s *Settler) Start(context.Context) error {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			job, ok := s.next()
			if !ok {
				return
			}
			s.settle(job)
		}
	}()
	return nil
}

// Submit queues a generation's receipts for settlement from escrow.
func (s *Settler) Submit(escrow uint64, receipts []*neuropb.UsageReceipt) {
	if len(receipts) == 0 {
		return
	}
	s.mu.Lock()
	s.queue = append(s.queue, settleJob{escrow: escrow, receipts: receipts})
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// CloseEscrow queues the end of escrow, after the receipts queued for it: its
// last settlement closes it (or, with none waiting, a settlement of no
// receipts), and what is left returns to its payer at once.
func (s *Settler) CloseEscrow(escrow uint64) {
	s.mu.Lock()
	queued := false
	for i := len(s.queue) - 1; i >= 0; i-- {
		if s.queue[i].escrow == escrow {
			s.queue[i].close, queued = true, true
			break
		}
	}
	if !queued {
		s.queue = append(s.queue, settleJob{escrow: escrow, close: true})
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// next waits for the next job; false once the settler closes with nothing
// queued.
func (s *Settler) next() (settleJob, bool) {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			job := s.queue[0]
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return job, true
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-s.closing:
			s.mu.Lock()
			empty := len(s.queue) == 0
			s.mu.Unlock()
			if empty || s.ctx.Err() != nil {
				return settleJob{}, false
			}
		}
	}
}

// settle sends job's receipts, one transaction per MaxReceipts.
func (s *Settler) settle(job settleJob) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.Timeout)
	defer cancel()
	receipts := job.receipts
	for first := true; first || len(receipts) > 0; first = false {
		chunk := receipts[:min(len(receipts), neuropb.MaxReceipts)]
		receipts = receipts[len(chunk):]
		closing := job.close && len(receipts) == 0
		if len(chunk) == 0 && !closing {
			return
		}
		if _, err := s.send.Send(ctx, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: job.escrow, Receipts: chunk, Close: closing}}
		}); err != nil {
			s.log.Warn("settle", "escrow", job.escrow, "receipts", len(chunk), "err", err)
			return
		}
		if s.cfg.OnSettled != nil && len(chunk) > 0 {
			s.cfg.OnSettled(job.escrow, chunk)
		}
		s.log.Info("settled expert work", "escrow", job.escrow, "receipts", len(chunk), "closed", closing)
	}
}

// Close settles what is queued for at most SettlerConfig.Drain, then
// stops; it returns once its goroutine has ended and is safe to call more
// than once.
func (s *Settler) Close() error {
	s.once.Do(func() {
		close(s.closing)
		done := make(chan struct{})
		go func() {
			s.wg.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(s.cfg.Drain):
			s.cancel()
			<-done
		}
		s.cancel()
		s.mu.Lock()
		left := 0
		for _, j := range s.queue {
			left += len(j.receipts)
		}
		s.queue = nil
		s.mu.Unlock()
		if left > 0 {
			s.log.Warn("receipts left unsettled at shutdown", "receipts", left)
		}
	})
	return nil
}
