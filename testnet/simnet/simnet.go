// Package simnet is a libp2p transport inside one process: connections
// are in-memory pipes between hosts that listen on /memory/N addresses,
// each direction delayed by the link's latency. Everything above the pipe
// is real libp2p (Noise, yamux, the resource manager), so a simulation of
// hundreds of hosts in one process measures the real stack without a
// socket per connection (a process's open files would run out first) and
// with the link latency the simulation chooses.
package simnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/transport"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// Network is the set of hosts that can reach each other. Its zero value is
// not usable; call New.
type Network struct {
	mu        sync.Mutex
	listeners map[uint64]*listener
	next      uint64
	latency   func(a, b uint64) time.Duration
	dials     atomic.Uint64
}

// Dials counts the connections dialled on the network so far (each costs
// both hosts a handshake).
func (n *Network) Dials() uint64 { return n.dials.Load() }

// New returns a network whose link from host a to host b (their /memory
// numbers) delays each write by latency(a, b) one way; nil: no delay.
func New(latency func(a, b uint64) time.Duration) *Network {
	return &Network{listeners: make(map[uint64]*listener), latency: latency, next: 1}
}

// Addr returns a fresh listen address on the network.
func (n *Network) Addr() ma.Multiaddr {
	n.mu.Lock()
	defer n.mu.Unlock()
	id := n.next
	n.next++
	return memoryAddr(id)
}

func memoryAddr(id uint64) ma.Multiaddr {
	return ma.StringCast("/memory/" + strconv.FormatUint(id, 10))
}

// Transport returns a constructor for libp2p.Transport.
func (n *Network) Transport() func(transport.Upgrader, network.ResourceManager) (*Transport, error) {
	return func(up transport.Upgrader, rcmgr network.ResourceManager) (*Transport, error) {
		return &Transport{net: n, up: up, rcmgr: rcmgr}, nil
	}
}

// backlog is how many dialed connections a listener holds before it
// accepts them, and backlogWait how long a dialer waits for room there.
const (
	backlog     = 128
	backlogWait = 10 * time.Second
)

// Transport is one host's side of the network.
type Transport struct {
	net   *Network
	up    transport.Upgrader
	rcmgr network.ResourceManager
	self  atomic.Uint64 // the host's listen number, once it listens
}

var _ transport.Transport = (*Transport)(nil)

func memoryID(a ma.Multiaddr) (uint64, error) {
	v, err := a.ValueForProtocol(ma.P_MEMORY)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(v, 10, 64)
}

// CanDial implements transport.Transport.
func (t *Transport) CanDial(a ma.Multiaddr) bool {
	_, err := memoryID(a)
	return err == nil && len(a) == 1
}

// Protocols implements transport.Transport.
func (t *Transport) Protocols() []int { return []int{ma.P_MEMORY} }

// Proxy implements transport.Transport.
func (t *Transport) Proxy() bool { return false }

// Dial implements transport.Transport.
func (t *Transport) Dial(ctx context.Context, raddr ma.Multiaddr, p peer.ID) (transport.CapableConn, error) {
	to, err := memoryID(raddr)
	if err != nil {
		return nil, fmt.Errorf("simnet: dial %s: %w", raddr, err)
	}
	scope, err := t.rcmgr.OpenConnection(network.DirOutbound, true, raddr)
	if err != nil {
		return nil, err
	}
	c, err := t.dial(ctx, to, raddr, p, scope)
	if err != nil {
		scope.Done()
		return nil, err
	}
	return c, nil
}

func (t *Transport) dial(ctx context.Context, to uint64, raddr ma.Multiaddr, p peer.ID, scope network.ConnManagementScope) (transport.CapableConn, error) {
	if err := scope.SetPeer(p); err != nil {
		return nil, err
	}
	// The dialer's side has the host's listen address, as TCP with port
	// reuse has it: peers that report what they observe (identify) then
	// report an address others can dial. A host that does not listen
	// gets an ephemeral one.
	t.net.mu.Lock()
	l := t.net.listeners[to]
	from := t.self.Load()
	if from == 0 {
		from = t.net.next
		t.net.next++
	}
	t.net.mu.Unlock()
	if l == nil {
		return nil, fmt.Errorf("simnet: dial %s: connection refused", raddr)
	}
	t.net.dials.Add(1)
	var out, back time.Duration
	if t.net.latency != nil {
		out, back = t.net.latency(from, to), t.net.latency(to, from)
	}
	a, b := pipe(memoryAddr(from), raddr, out, back)
	// A listener's backlog is bounded, as a socket's: a host that does
	// not accept is refused after a while instead of holding the dialer.
	t0 := time.NewTimer(backlogWait)
	defer t0.Stop()
	select {
	case l.conns <- b:
	case <-l.done:
		return nil, fmt.Errorf("simnet: dial %s: connection refused", raddr)
	case <-t0.C:
		return nil, fmt.Errorf("simnet: dial %s: connection timed out (the listener's backlog is full)", raddr)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return t.up.Upgrade(ctx, t, a, network.DirOutbound, p, scope)
}

// Listen implements transport.Transport.
func (t *Transport) Listen(laddr ma.Multiaddr) (transport.Listener, error) {
	id, err := memoryID(laddr)
	if err != nil {
		return nil, fmt.Errorf("simnet: listen %s: %w", laddr, err)
	}
	l := &listener{net: t.net, id: id, addr: laddr, conns: make(chan manet.Conn, backlog), done: make(chan struct{})}
	t.net.mu.Lock()
	if t.net.listeners[id] != nil {
		t.net.mu.Unlock()
		return nil, fmt.Errorf("simnet: listen %s: address already in use", laddr)
	}
	t.net.listeners[id] = l
	t.net.next = max(t.net.next, id+1)
	t.net.mu.Unlock()
	t.self.CompareAndSwap(0, id)
	return t.up.UpgradeGatedMaListener(t, t.up.GateMaListener(l)), nil
}

// listener is a host's listen address: dialers hand it one end of a pipe.
type listener struct {
	net   *Network
	id    uint64
	addr  ma.Multiaddr
	conns chan manet.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *listener) Accept() (manet.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *listener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.net.mu.Lock()
		delete(l.net.listeners, l.id)
		l.net.mu.Unlock()
	})
	return nil
}

func (l *listener) Multiaddr() ma.Multiaddr { return l.addr }
func (l *listener) Addr() net.Addr          { return addr(l.addr) }

// addr is a /memory address as a net.Addr.
type addr ma.Multiaddr

func (a addr) Network() string { return "memory" }
func (a addr) String() string  { return ma.Multiaddr(a).String() }

// chunk is one write, readable from at on.
type chunk struct {
	b  []byte
	at time.Time
}

// pipe returns the two ends of a connection: what a writes reaches b
// after ab, what b writes reaches a after ba.
func pipe(aAddr, bAddr ma.Multiaddr, ab, ba time.Duration) (*end, *end) {
	toB, toA := make(chan chunk, 64), make(chan chunk, 64)
	aDone, bDone := make(chan struct{}), make(chan struct{})
	a := &end{local: aAddr, remote: bAddr, in: toA, out: toB, delay: ab, done: aDone, peerDone: bDone}
	b := &end{local: bAddr, remote: aAddr, in: toB, out: toA, delay: ba, done: bDone, peerDone: aDone}
	a.rd.init()
	a.wd.init()
	b.rd.init()
	b.wd.init()
	return a, b
}

// end is one side of a pipe: a manet.Conn.
type end struct {
	local, remote ma.Multiaddr
	in            <-chan chunk
	out           chan<- chunk
	delay         time.Duration
	pending       []byte
	done          chan struct{} // closed by Close
	peerDone      chan struct{} // closed by the other end's Close
	once          sync.Once
	rd, wd        deadline
}

var _ manet.Conn = (*end)(nil)

func (e *end) Read(b []byte) (int, error) {
	if len(e.pending) == 0 {
		var c chunk
		select {
		case c = <-e.in: // what was written before a close is still read
		default:
			select {
			case c = <-e.in:
			case <-e.done:
				return 0, net.ErrClosed
			case <-e.peerDone:
				select {
				case c = <-e.in:
				default:
					return 0, io.EOF
				}
			case <-e.rd.wait():
				return 0, os.ErrDeadlineExceeded
			}
		}
		if wait := time.Until(c.at); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-e.done:
				t.Stop()
				return 0, net.ErrClosed
			}
		}
		e.pending = c.b
	}
	n := copy(b, e.pending)
	e.pending = e.pending[n:]
	return n, nil
}

func (e *end) Write(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	c := chunk{b: append([]byte(nil), b...), at: time.Now().Add(e.delay)}
	select {
	case <-e.done:
		return 0, net.ErrClosed
	case <-e.peerDone:
		return 0, errBrokenPipe
	default:
	}
	select {
	case e.out <- c:
		return len(b), nil
	case <-e.done:
		return 0, net.ErrClosed
	case <-e.peerDone:
		return 0, errBrokenPipe
	case <-e.wd.wait():
		return 0, os.ErrDeadlineExceeded
	}
}

var errBrokenPipe = errors.New("simnet: broken pipe")

func (e *end) Close() error {
	e.once.Do(func() { close(e.done) })
	return nil
}

func (e *end) LocalAddr() net.Addr                { return addr(e.local) }
func (e *end) RemoteAddr() net.Addr               { return addr(e.remote) }
func (e *end) LocalMultiaddr() ma.Multiaddr       { return e.local }
func (e *end) RemoteMultiaddr() ma.Multiaddr      { return e.remote }
func (e *end) SetReadDeadline(t time.Time) error  { e.rd.set(t); return nil }
func (e *end) SetWriteDeadline(t time.Time) error { e.wd.set(t); return nil }
func (e *end) SetDeadline(t time.Time) error {
	e.rd.set(t)
	e.wd.set(t)
	return nil
}

// deadline is a settable deadline whose wait channel closes when it
// passes (the zero time: never).
type deadline struct {
	mu    sync.Mutex
	timer *time.Timer
	c     chan struct{}
}

func (d *deadline) init() { d.c = make(chan struct{}) }

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.c // the timer closed it: wait for that, then start afresh
	}
	d.timer = nil
	select {
	case <-d.c:
		d.c = make(chan struct{})
	default:
	}
	if t.IsZero() {
		return
	}
	if dur := time.Until(t); dur <= 0 {
		close(d.c)
		return
	}
	c := d.c
	d.timer = time.AfterFunc(time.Until(t), func() { close(c) })
}

func (d *deadline) wait() chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.c
}
