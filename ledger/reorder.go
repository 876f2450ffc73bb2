package ledger

import (
	"sort"
	"time"

	"github.com/neuro-p2p/neuro/neuropb"
)

// reorder holds transactions that came over the ledger topic ahead of
// their turn: GossipSub does not keep a sender's order, so nonce n+1 may
// reach a validator before n. A held transaction is offered again after
// each of its sender's transactions is accepted, and dropped after
// holdFor or when more than maxHeld are held.
type reorder struct {
	held    map[string][]heldTx // by sender
	n       int
	holdFor time.Duration
	maxHeld int
}

type heldTx struct {
	tx   *neuropb.LedgerTx
	when time.Time
}

func newReorder(holdFor time.Duration, maxHeld int) *reorder {
	return &reorder{held: map[string][]heldTx{}, holdFor: holdFor, maxHeld: maxHeld}
}

// hold keeps tx, refused for its nonce, for a later try. It reports false
// when the buffer is full.
func (r *reorder) hold(tx *neuropb.LedgerTx, now time.Time) bool {
	r.expire(now)
	if r.n >= r.maxHeld {
		return false
	}
	s := string(tx.GetSender())
	for _, h := range r.held[s] {
		if h.tx.GetNonce() == tx.GetNonce() {
			return true // a copy is held already
		}
	}
	r.held[s] = append(r.held[s], heldTx{tx, now})
	sort.Slice(r.held[s], func(i, j int) bool { return r.held[s][i].tx.GetNonce() < r.held[s][j].tx.GetNonce() })
	r.n++
	return true
}

// next takes the sender's held transactions out, in nonce order, for
// another try (those refused again go back through hold).
func (r *reorder) next(sender []byte, now time.Time) []*neuropb.LedgerTx {
	r.expire(now)
	hs := r.held[string(sender)]
	delete(r.held, string(sender))
	r.n -= len(hs)
	out := make([]*neuropb.LedgerTx, len(hs))
	for i, h := range hs {
		out[i] = h.tx
	}
	return out
}

func (r *reorder) expire(now time.Time) {
	for s, hs := range r.held {
		kept := hs[:0]
		for _, h := range hs {
			if now.Sub(h.when) < r.holdFor {
				kept = append(kept, h)
			}
		}
		r.n -= len(hs) - len(kept)
		if len(kept) == 0 {
			delete(r.held, s)
		} else {
			r.held[s] = kept
		}
	}
}
