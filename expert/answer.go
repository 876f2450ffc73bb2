package expert

import (
	"runtime"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// DefaultLateReceiptsFlush is how long after a stream's last answer an
// expert node signs the receipts it still holds unsigned for a caller
// that takes them late (ExpertRequest.late_receipts), and sends them in a
// message of their own. While answers keep coming, their receipts are
// signed neuropb.MaxReceiptBatch at a time (one signature for 8 layers'
// answers of a top-2 model, where each answer took one) and ride on the
// next answer. A gating node's layers follow each other within it, so a
// generation's receipts cost it no message of their own.
const DefaultLateReceiptsFlush = 5 * time.Millisecond

// maxOwed bounds the late receipts an answerer holds for a stream: more
// go at once, in a message of their own.
const maxOwed = 4 * neuropb.MaxGroup

// answerer writes one stream's responses and signs their receipts: one
// signature for a response's receipts (its group's members' and a batched
// call's segments' together). For a caller that takes them late, the
// answer goes first, without them; their receipts wait, digests added,
// until the stream holds neuropb.MaxReceiptBatch of them, which are then
// signed at once and follow in the next response written on the stream
// (receipts_for). Config.LateReceiptsFlush after the stream's last answer
// the rest are signed and sent in a message of their own.
type answerer struct {
	s    *Server
	st   network.Stream
	w    *wire.Writer
	poll bool // keep a core awake after each answer (Config.WaitPoll)

	jmu  sync.Mutex
	jobs map[uint64]*job // admitted jobs not yet answered, by request id (track)

	mu       sync.Mutex // serialises writes; guards the fields below
	broken   bool
	stopped  bool
	unsigned []*neuropb.ExpertResponse // late receipts, digests added, not yet signed
	held     int                       // the receipts in unsigned
	owed     []*neuropb.ExpertResponse // signed late receipts not yet sent
	timer    *time.Timer               // signs and sends what is held alone (flush); reset by each late answer
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
// that had some marked receipts_follow), then adds their digests and holds
// them until a batch is full (sign) or the stream goes quiet (flush).
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
	// The poll starts once the receipts are held (or signed): on a node
	// of one core the poller took it from the signature.
	defer a.polled()
	if len(entries) == 0 {
		return
	}
	// The answer goes out now: the stream's connection writes it from a
	// goroutine of its own (yamux's send loop), which the write readied
	// but which would wait for this one to block, after the digests
	// (pinned testnet: 195 µs at the median from the write to the
	// caller's read, 90-120 with this).
	runtime.Gosched()
	n := 0
	for i, e := range entries {
		if ejs[i] != nil {
			ejs[i].digest(e.Receipt, e.Receipts, outs[i])
		}
		n += receiptCount(e)
	}
	a.mu.Lock()
	if a.broken || a.stopped {
		a.mu.Unlock()
		return
	}
	a.unsigned, a.held = append(a.unsigned, entries...), a.held+n
	var full []*neuropb.ExpertResponse
	if a.held >= neuropb.MaxReceiptBatch {
		full, a.unsigned, a.held = a.unsigned, nil, 0
	}
	if a.timer == nil {
		a.timer = time.AfterFunc(a.s.cfg.lateFlush(), a.flush)
	} else {
		a.timer.Reset(a.s.cfg.lateFlush())
	}
	a.mu.Unlock()
	if full != nil {
		a.owe(a.sign(full))
	}
}

// sign signs entries' receipts, neuropb.MaxReceiptBatch to a signature.
// Receipts that fail to sign are dropped: the entries go without them, so
// that the caller stops waiting for them.
func (a *answerer) sign(entries []*neuropb.ExpertResponse) []*neuropb.ExpertResponse {
	if err := a.s.cfg.SignReceipts(receiptsIn(entries)); err != nil {
		a.s.log.Warn("usage receipts not signed", "err", err)
		for _, e := range entries {
			e.Receipt, e.Receipts = nil, nil
		}
	}
	return entries
}

// owe keeps signed entries for the next response; too many go at once.
func (a *answerer) owe(entries []*neuropb.ExpertResponse) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.broken || a.stopped {
		return
	}
	a.owed = append(a.owed, entries...)
	if len(a.owed) >= maxOwed {
		a.writeLocked(&neuropb.ExpertResponse{})
	}
}

// flush signs the receipts held and sends them, with those owed, in a
// message of their own.
func (a *answerer) flush() {
	a.mu.Lock()
	held := a.unsigned
	a.unsigned, a.held = nil, 0
	a.mu.Unlock()
	if len(held) > 0 {
		held = a.sign(held)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopped {
		return
	}
	a.owed = append(a.owed, held...)
	if len(a.owed) > 0 {
		a.writeLocked(&neuropb.ExpertResponse{})
	}
}

// stop ends the answerer with its stream: nothing more is written.
func (a *answerer) stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.stopped = true
	a.owed, a.unsigned = nil, nil
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

// receiptCount is how many receipts e carries: its own and its segments'.
func receiptCount(e *neuropb.ExpertResponse) int {
	n := len(e.Receipts)
	if e.Receipt != nil {
		n++
	}
	return n
}

// receiptsOf are the receipts of resp and its group, in order.
func receiptsOf(resp *neuropb.ExpertResponse) []*neuropb.UsageReceipt {
	return receiptsIn(members(resp))
}

// receiptsIn are the receipts of responses ms (each its own, then its
// segments'), in order.
func receiptsIn(ms []*neuropb.ExpertResponse) []*neuropb.UsageReceipt {
	var rs []*neuropb.UsageReceipt
	for _, m := range ms {
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
