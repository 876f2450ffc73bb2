package simnet

import (
	"cmp"
	"runtime"
	"slices"
	"strings"
	"sync"

	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// DialCallers is a connection gater that lets every connection through
// and counts, for each dial a host makes, the code that asked for it: the
// first function outside go-libp2p's swarm and host, and the first of
// neuro's own above it. A simulation hands one to every host and reports
// what its dials are for (each is a Noise handshake and an identify on
// both hosts).
type DialCallers struct {
	mu     sync.Mutex
	counts map[string]uint64
}

// NewDialCallers makes an empty count.
func NewDialCallers() *DialCallers { return &DialCallers{counts: map[string]uint64{}} }

// Caller is one caller and its dials.
type Caller struct {
	Caller string `json:"caller"`
	Dials  uint64 `json:"dials"`
}

// Counts is the count so far, most dials first.
func (d *DialCallers) Counts() []Caller {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]Caller, 0, len(d.counts))
	for c, n := range d.counts {
		out = append(out, Caller{c, n})
	}
	slices.SortFunc(out, func(a, b Caller) int {
		return cmp.Or(cmp.Compare(b.Dials, a.Dials), strings.Compare(a.Caller, b.Caller))
	})
	return out
}

// InterceptPeerDial runs in the goroutine of the code that dials (go-libp2p
// calls it before a dial, once it has found no connection to use).
func (d *DialCallers) InterceptPeerDial(peer.ID) bool {
	d.record(callerOf(3))
	return true
}

func (d *DialCallers) record(c string) {
	d.mu.Lock()
	d.counts[c]++
	d.mu.Unlock()
}

// callerOf names the code above go-libp2p's dialling that asked for a
// dial: the first function, then the first of neuro's above it or else
// the function its goroutine started in, without the module prefixes
// ("kad-dht.(*query).queryPeer" runs in a goroutine of its own, whatever
// the lookup is for).
func callerOf(skip int) string {
	pc := make([]uintptr, 64)
	frames := runtime.CallersFrames(pc[:runtime.Callers(skip, pc)])
	var first, own, root string
	for more := true; more && own == ""; {
		var f runtime.Frame
		f, more = frames.Next()
		fn := f.Function
		if fn != "" && !strings.HasPrefix(fn, "runtime.") {
			root = fn
		}
		switch {
		case fn == "", strings.HasPrefix(fn, "runtime."),
			strings.HasPrefix(fn, "github.com/libp2p/go-libp2p/p2p/net/swarm."),
			strings.HasPrefix(fn, "github.com/libp2p/go-libp2p/p2p/host/"),
			strings.HasPrefix(fn, "github.com/libp2p/go-libp2p/p2p/protocol/identify."):
		case first == "":
			first = short(fn)
			if strings.HasPrefix(fn, neuroModule) {
				return first
			}
		case strings.HasPrefix(fn, neuroModule):
			own = short(fn)
		}
	}
	switch {
	case first == "":
		return "unknown"
	case own != "":
		return first + " < " + own
	case short(root) != first:
		return first + " < go " + short(root)
	}
	return first
}

const neuroModule = "github.com/neuro-p2p/neuro/"

func short(fn string) string {
	for _, p := range []string{neuroModule, "github.com/libp2p/", "github.com/"} {
		if s, ok := strings.CutPrefix(fn, p); ok {
			return s
		}
	}
	return fn
}

// The rest of the gater lets everything through.

func (d *DialCallers) InterceptAddrDial(peer.ID, ma.Multiaddr) bool { return true }
func (d *DialCallers) InterceptAccept(network.ConnMultiaddrs) bool  { return true }
func (d *DialCallers) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}
func (d *DialCallers) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}
