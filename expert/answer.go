package expert

import (
	"runtime"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// DefaultLateReceiptsFlush is how long at most an expert node keeps the signed
// receipts of an answer whose caller takes them late
// (ExpertRequest.late_receipts) for the stream's next answer to carry:
// a gating node's next layer usually asks within it, so in a generation
// the receipts ride on answers and cost the caller no message of their
// own; after it they go alone.
const DefaultLateReceiptsFlush = 2 * time.Millisecond

// maxOwed bounds the late receipts an answerer holds for a stream: more
// go at once, in a message of their own.
const maxOwed = 4 * neuropb.MaxGroup

// answerer writes one stream's responses and signs their receipts: one
// signature for a response's receipts (its group's members' and a batched
// call's segments' together). For a caller that takes them late, the
// answer goes first, without them, and the signed receipts follow in the
// next response written on the stream (receipts_for), or in one of their
// own within Config.LateReceiptsFlush.
type answerer struct {
	s    *Server
	st   network.Stream
	w    *wire.Writer
	poll bool // keep a core awake after each answer (Config.WaitPoll)

	jmu  sync.Mutex
	jobs map[uint64]*job // admitted jobs not yet answered, by request id (track)

	mu      sync.Mutex // serialises writes; guards the fields below
	broken  bool
	stopped bool
	owed    []*neuropb.ExpertResponse // signed late receipts not yet sent
	timer   *time.Timer               // sends owed alone (flush); armed while owed is not empty
}

// replier returns how a request's answers are sent: with their receipts
// signed, or, when late, with their receipts after them.
func (a *answerer) replier(late bool) func(*neuropb.ExpertResponse) {
	if !late || !a.s.cfg.signs() {
		return a.answer
	}
	return a.answerLate
}

// track keeps j until it is answered: its answer's receipts take their
// input digests from it.
func (a *answerer) track(j *job) {
	a.jmu.Lock()
	defer a.jmu.Unlock()
	if a.jobs == nil {
		a.jobs = map[uint64]*job{}
	}
	a.jobs[j.id] = j
}

// jobsOf takes the tracked jobs of resp's members (nil for a member not
// tracked), in members' order.
func (a *answerer) jobsOf(ms []*neuropb.ExpertResponse) []*job {
	a.jmu.Lock()
	defer a.jmu.Unlock()
	js := make([]*job, len(ms))
	for i, m := range ms {
		js[i] = a.jobs[m.GetRequestId()]
		delete(a.jobs, m.GetRequestId())
	}
	return js
}

// answer signs resp's receipts (and its group's), digests added, and
// writes it. Receipts that fail to sign are dropped: the answer goes
// without them.
func (a *answerer) answer(resp *neuropb.ExpertResponse) {
	ms := members(resp)
	for i, j := range a.jobsOf(ms) {
		if j != nil {
			j.digest(ms[i].Receipt, ms[i].Receipts, ms[i].Output)
		}
	}
	if rs := receiptsOf(resp); len(rs) > 0 {
		if err := a.s.cfg.SignReceipts(rs); err != nil {
			a.s.log.Warn("usage receipts not signed", "err", err)
			for _, m := range ms {
				m.Receipt, m.Receipts = nil, nil
			}
		}
	}
	a.write(resp)
	a.polled()
}

// answerLate writes resp at once with its receipts taken off (each member
// that had some marked receipts_follow), then adds their digests, signs
// them and owes them to the caller.
func (a *answerer) answerLate(resp *neuropb.ExpertResponse) {
	ms := members(resp)
	js := a.jobsOf(ms)
	var entries []*neuropb.ExpertResponse
	var outs []*neuropb.Tensor
	var ejs []*job
	for i, m := range ms {
		if m.Receipt == nil && len(m.Receipts) == 0 {
			continue
		}
		entries = append(entries, &neuropb.ExpertResponse{RequestId: m.GetRequestId(), Receipt: m.Receipt, Receipts: m.Receipts})
		outs, ejs = append(outs, m.Output), append(ejs, js[i])
		m.Receipt, m.Receipts, m.ReceiptsFollow = nil, nil, true
	}
	a.write(resp)
	// The poll starts once the receipts are signed: on a node of one core
	// the poller took it from the signature.
	defer a.polled()
	if len(entries) == 0 {
		return
	}
	// The answer goes out now: the stream's connection writes it from a
	// goroutine of its own (yamux's send loop), which the write readied
	// but which would wait for this one to block, after the digests and
	// the signature (pinned testnet: 195 µs at the median from the write
	// to the caller's read, 90-120 with this).
	runtime.Gosched()
	var rs []*neuropb.UsageReceipt
	for i, e := range entries {
		if ejs[i] != nil {
			ejs[i].digest(e.Receipt, e.Receipts, outs[i])
		}
		if e.Receipt != nil {
			rs = append(rs, e.Receipt)
		}
		rs = append(rs, e.Receipts...)
	}
	if err := a.s.cfg.SignReceipts(rs); err != nil {
		// The entries go without receipts, so that the caller stops
		// waiting for them.
		a.s.log.Warn("usage receipts not signed", "err", err)
		for _, e := range entries {
			e.Receipt, e.Receipts = nil, nil
		}
	}
	a.owe(entries)
}

// owe keeps entries for the next response, arming the flush.
func (a *answerer) owe(entries []*neuropb.ExpertResponse) {
	a.mu.Lock()
	if a.broken || a.stopped {
		a.mu.Unlock()
		return
	}
	a.owed = append(a.owed, entries...)
	if len(a.owed) >= maxOwed {
		a.writeLocked(&neuropb.ExpertResponse{})
		a.mu.Unlock()
		return
	}
	if a.timer == nil {
		a.timer = time.AfterFunc(a.s.cfg.lateFlush(), a.flush)
	} else if len(a.owed) == len(entries) {
		a.timer.Reset(a.s.cfg.lateFlush())
	}
	a.mu.Unlock()
}

// flush sends the receipts owed, if any, in a message of their own.
func (a *answerer) flush() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.owed) > 0 && !a.stopped {
		a.writeLocked(&neuropb.ExpertResponse{})
	}
}

// stop ends the answerer with its stream: nothing more is written.
func (a *answerer) stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.stopped = true
	a.owed = nil
	if a.timer != nil {
		a.timer.Stop()
	}
}

// write writes resp, with the receipts owed.
func (a *answerer) write(resp *neuropb.ExpertResponse) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.writeLocked(resp)
}

func (a *answerer) writeLocked(resp *neuropb.ExpertResponse) {
	if a.broken || a.stopped {
		return
	}
	if len(a.owed) > 0 {
		resp.ReceiptsFor, a.owed = a.owed, nil
	}
	_ = a.st.SetWriteDeadline(time.Now().Add(a.s.cfg.WriteTimeout))
	if err := a.w.Write(resp); err != nil {
		a.broken = true
		a.s.log.Debug("expert stream: write", "peer", a.st.Conn().RemotePeer(), "err", err)
		a.st.Reset()
		return
	}
}

// polled keeps a core awake after an answer, when the node polls: the
// caller's next layer usually comes within the poll.
func (a *answerer) polled() {
	if a.poll {
		a.s.cfg.WaitPoll.PollFor(a.s.cfg.WaitPollFor)
	}
}

// members are resp and its group's responses.
func members(resp *neuropb.ExpertResponse) []*neuropb.ExpertResponse {
	if len(resp.Group) == 0 {
		return []*neuropb.ExpertResponse{resp}
	}
	return append([]*neuropb.ExpertResponse{resp}, resp.Group...)
}

// receiptsOf are the receipts of resp and its group, in order.
func receiptsOf(resp *neuropb.ExpertResponse) []*neuropb.UsageReceipt {
	var rs []*neuropb.UsageReceipt
	for _, m := range members(resp) {
		if m.Receipt != nil {
			rs = append(rs, m.Receipt)
		}
		rs = append(rs, m.Receipts...)
	}
	return rs
}

// lateFlush is LateReceiptsFlush or its default.
func (c Config) lateFlush() time.Duration {
	if c.LateReceiptsFlush > 0 {
		return c.LateReceiptsFlush
	}
	return DefaultLateReceiptsFlush
}

// signs says whether the node signs usage receipts.
func (c Config) signs() bool { return c.SignReceipts != nil }
