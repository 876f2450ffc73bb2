// Package netns builds an emulated internet on one Linux machine out of
// network namespaces, for the testnet: public hosts on a shared segment
// (198.51.100.0/24, a documentation range, on a bridge with no uplink) and
// homes, each a host behind its own NAT router (iptables MASQUERADE):
// endpoint-independent mapping ("cone": Linux keeps the source port) or
// address-and-port-dependent mapping ("symmetric": --random-fully picks a
// new port per destination). Nothing in it has a route to this machine's
// real interfaces or to any address outside the topology. A home's line to
// its router can be given a round-trip time, jitter, loss and bandwidth
// (Link). Namespaces are
// named by a prefix, so that a run that crashed is cleaned up by the next
// (Cleanup). It needs root, iproute2 and iptables.
package netns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// NAT is a home router's kind of NAT.
type NAT string

// The NAT kinds.
const (
	Cone      NAT = "cone"
	Symmetric NAT = "symmetric"
)

// ParseNAT parses "cone" or "symmetric".
func ParseNAT(s string) (NAT, error) {
	switch NAT(s) {
	case Cone, Symmetric:
		return NAT(s), nil
	}
	return "", fmt.Errorf("NAT kind %q: want cone or symmetric", s)
}

// Topology is what Create builds.
type Topology struct {
	// Prefix starts every namespace's name (and nothing else's).
	Prefix string
	// Publics is the number of hosts on the public segment.
	Publics int
	// Homes lists the NAT kind of each home.
	Homes []NAT
	// Links is how each home's line to its router behaves: none (plain
	// lines), one for every home, or one per home.
	Links []Link
}

// linkOf is home i's line.
func (t Topology) linkOf(i int) Link {
	switch len(t.Links) {
	case 0:
		return Link{}
	case 1:
		return t.Links[0]
	}
	return t.Links[i]
}

// Host is a namespace a node can run in, and its address.
type Host struct {
	NS string
	IP net.IP
}

// Home is a host behind a NAT router.
type Home struct {
	Host
	// Router is the router's namespace and its public (WAN) address: what
	// the internet sees of the home.
	Router Host
	NAT    NAT
}

// Net is a built topology.
type Net struct {
	Prefix  string
	Inet    string // the namespace of the public segment's bridge
	Publics []Host
	Homes   []Home
	// Links is each home's line (a zero Link for a plain one).
	Links []Link
	lines []*line // one a home, when any line is shaped
}

// Addresses of the topology.
const (
	maxHosts = 80
)

func publicIP(i int) net.IP { return net.IPv4(198, 51, 100, byte(10+i)) }
func routerIP(i int) net.IP { return net.IPv4(198, 51, 100, byte(100+i)) }
func lanIP(home, host int) net.IP {
	return net.IPv4(10, byte(home+1), 0, byte(host))
}

// Available says why namespaces cannot be built here, or nil. It probes
// once per process: tests running at once each asked, and two probes of
// one process (one name) collided ("File exists").
func Available() error { return available() }

var available = sync.OnceValue(probeAvailable)

func probeAvailable() error {
	if os.Geteuid() != 0 {
		return errors.New("network namespaces need root")
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed (apt-get install iproute2 iptables)", tool)
		}
	}
	probe := fmt.Sprintf("nsprobe%d", os.Getpid())
	if err := run(context.Background(), "ip", "netns", "add", probe); err != nil {
		return fmt.Errorf("the kernel refuses network namespaces: %w", err)
	}
	return run(context.Background(), "ip", "netns", "del", probe)
}

// Create builds the topology. On failure it removes what it made.
func Create(ctx context.Context, t Topology) (_ *Net, err error) {
	if t.Prefix == "" || strings.ContainsAny(t.Prefix, "/ \t") || len(t.Prefix) > 24 {
		return nil, fmt.Errorf("netns: prefix %q: want a short name", t.Prefix)
	}
	if t.Publics < 1 || t.Publics > maxHosts || len(t.Homes) > maxHosts {
		return nil, fmt.Errorf("netns: %d public hosts and %d homes: want 1 to %d of each", t.Publics, len(t.Homes), maxHosts)
	}
	if len(t.Links) > 1 && len(t.Links) != len(t.Homes) {
		return nil, fmt.Errorf("netns: %d links for %d homes: give none, one, or one per home", len(t.Links), len(t.Homes))
	}
	for i, l := range t.Links {
		if err := l.Validate(); err != nil {
			return nil, fmt.Errorf("netns: link %d: %w", i, err)
		}
	}
	if err := Cleanup(ctx, t.Prefix); err != nil {
		return nil, err
	}
	n := &Net{Prefix: t.Prefix, Inet: t.Prefix + "-inet"}
	defer func() {
		if err != nil {
			err = errors.Join(err, n.Close())
		}
	}()
	b := &builder{ctx: ctx}
	b.addNS(n.Inet)
	b.ip(n.Inet, "link", "add", "br0", "type", "bridge")
	b.ip(n.Inet, "link", "set", "br0", "up")
	// A host on the public segment: a veth whose other end is a port of
	// the bridge.
	attach := func(ns, dev, port string, ip net.IP) {
		b.ip(ns, "link", "add", dev, "type", "veth", "peer", "name", port, "netns", n.Inet)
		b.ip(n.Inet, "link", "set", port, "master", "br0")
		b.ip(n.Inet, "link", "set", port, "up")
		b.ip(ns, "addr", "add", ip.String()+"/24", "dev", dev)
		b.ip(ns, "link", "set", dev, "up")
	}
	for i := range t.Publics {
		h := Host{NS: fmt.Sprintf("%s-pub%d", t.Prefix, i), IP: publicIP(i)}
		b.addNS(h.NS)
		attach(h.NS, "eth0", fmt.Sprintf("p%d", i), h.IP)
		n.Publics = append(n.Publics, h)
	}
	// Once one home's line is shaped, every home gets a user-space line (a
	// zero Link passes packets at once), so that the lines match the homes.
	shaped := slices.ContainsFunc(t.Links, Link.Shaped)
	for i, kind := range t.Homes {
		if _, err := ParseNAT(string(kind)); err != nil {
			return nil, fmt.Errorf("netns: home %d: %w", i, err)
		}
		h := Home{Host: Host{NS: fmt.Sprintf("%s-home%d", t.Prefix, i), IP: lanIP(i, 2)},
			Router: Host{NS: fmt.Sprintf("%s-nat%d", t.Prefix, i), IP: routerIP(i)}, NAT: kind}
		b.addNS(h.Router.NS)
		b.addNS(h.NS)
		attach(h.Router.NS, "wan", fmt.Sprintf("r%d", i), h.Router.IP)
		link := t.linkOf(i)
		n.Links = append(n.Links, link)
		if shaped {
			// A point-to-point line of two TUN devices, joined by a delay
			// line in this process.
			var homeDev, routerDev *os.File
			b.do(func() (err error) {
				if err = h.Do(func() (err error) { homeDev, err = openTUN("eth0"); return err }); err != nil {
					return err
				}
				if err = h.Router.Do(func() (err error) { routerDev, err = openTUN("lan"); return err }); err != nil {
					homeDev.Close()
					return err
				}
				n.lines = append(n.lines, startLine(homeDev, routerDev, link, uint64(i)+1))
				return nil
			})
			b.ip(h.Router.NS, "addr", "add", lanIP(i, 1).String(), "peer", h.IP.String()+"/32", "dev", "lan")
			b.ip(h.NS, "addr", "add", h.IP.String(), "peer", lanIP(i, 1).String()+"/32", "dev", "eth0")
			if link.Bandwidth > 0 {
				b.exec(h.NS, append([]string{"tc"}, tbfArgs("eth0", link.Bandwidth)...)...)
				b.exec(h.Router.NS, append([]string{"tc"}, tbfArgs("lan", link.Bandwidth)...)...)
			}
		} else {
			b.ip(h.NS, "link", "add", "eth0", "type", "veth", "peer", "name", "lan", "netns", h.Router.NS)
			b.ip(h.Router.NS, "addr", "add", lanIP(i, 1).String()+"/24", "dev", "lan")
			b.ip(h.NS, "addr", "add", h.IP.String()+"/24", "dev", "eth0")
		}
		b.ip(h.Router.NS, "link", "set", "lan", "up")
		b.ip(h.NS, "link", "set", "eth0", "up")
		b.ip(h.NS, "route", "add", "default", "via", lanIP(i, 1).String())
		// Forward, and say at once that an address outside the topology is
		// unreachable (no rate limit on those ICMP messages).
		b.exec(h.Router.NS, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 0 > /proc/sys/net/ipv4/icmp_ratelimit")
		masq := []string{"iptables", "-t", "nat", "-A", "POSTROUTING", "-s", lanIP(i, 0).String() + "/24", "-o", "wan", "-j", "MASQUERADE"}
		if kind == Symmetric {
			masq = append(masq, "--random-fully")
		}
		b.exec(h.Router.NS, masq...)
		// Nothing enters a home unasked: only replies to what it sent.
		b.exec(h.Router.NS, "iptables", "-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
		b.exec(h.Router.NS, "iptables", "-A", "FORWARD", "-i", "wan", "-j", "DROP")
		// Unasked packets to the router itself are dropped silently, as home
		// routers do, before conntrack confirms an entry for them: a peer's
		// hole-punching packet that arrives before the home's own would
		// otherwise hold the mapping's ports and make the NAT pick others.
		b.exec(h.Router.NS, "iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP")
		n.Homes = append(n.Homes, h)
	}
	if b.err != nil {
		return nil, fmt.Errorf("netns: %w", b.err)
	}
	return n, nil
}

// Namespaces lists the topology's namespaces.
func (n *Net) Namespaces() []string {
	out := []string{n.Inet}
	for _, h := range n.Publics {
		out = append(out, h.NS)
	}
	for _, h := range n.Homes {
		out = append(out, h.Router.NS, h.NS)
	}
	return out
}

// Close deletes every namespace of the topology (and with them its
// links, addresses, routes and NAT rules).
func (n *Net) Close() error {
	var errs []error
	for _, ln := range n.lines {
		errs = append(errs, ln.close())
	}
	n.lines = nil
	return errors.Join(append(errs, Cleanup(context.Background(), n.Prefix))...)
}

// LineStats says what each home's line carried (nil when no line is
// shaped).
func (n *Net) LineStats() []LineStats {
	var out []LineStats
	for _, ln := range n.lines {
		out = append(out, ln.stats())
	}
	return out
}

// Cleanup deletes every namespace whose name starts with prefix + "-":
// what a run that crashed left behind.
func Cleanup(ctx context.Context, prefix string) error {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return fmt.Errorf("netns: list: %w", err)
	}
	var errs []error
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], prefix+"-") {
			if err := run(ctx, "ip", "netns", "del", f[0]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Command runs name in the host's namespace.
func (h Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Do runs f on an OS thread inside the host's namespace: sockets f opens
// (listeners too, after it returns) belong to that namespace.
func (h Host) Do(f func() error) error {
	target, err := os.Open("/run/netns/" + h.NS)
	if err != nil {
		return fmt.Errorf("netns %s: %w", h.NS, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer home.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", h.NS, err)
			return
		}
		ferr := f()
		if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked and dies with this goroutine rather
			// than run other goroutines in the wrong namespace.
			errc <- errors.Join(ferr, fmt.Errorf("setns back: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// builder runs commands until the first error.
type builder struct {
	ctx context.Context
	err error
}

func (b *builder) do(f func() error) {
	if b.err == nil {
		b.err = f()
	}
}

func (b *builder) addNS(name string) {
	if b.err == nil {
		b.err = run(b.ctx, "ip", "netns", "add", name)
	}
	b.ip(name, "link", "set", "lo", "up")
}

func (b *builder) ip(ns string, args ...string) {
	if b.err == nil {
		b.err = run(b.ctx, "ip", append([]string{"-n", ns}, args...)...)
	}
}

func (b *builder) exec(ns string, args ...string) {
	if b.err == nil {
		b.err = run(b.ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	}
}

func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}
