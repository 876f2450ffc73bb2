package netns

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Link is how a home's line to its router behaves. This kernel has no
// netem qdisc, so delay, jitter and loss are applied in user space: the
// home's side and the router's side of the line are TUN devices, and a
// delay line in the process that built the topology carries the home's
// packets between them. Bandwidth is the kernel's tbf qdisc on both ends.
type Link struct {
	// RTT is the round trip between any two homes: each home's outgoing
	// packets wait RTT/2 on its line (so a home and a public host are RTT/2
	// apart). Zero adds nothing.
	RTT time.Duration
	// Jitter spreads each packet's wait uniformly over ±Jitter (never
	// below zero, and never so that packets overtake each other).
	Jitter time.Duration
	// Loss is the probability that an outgoing packet is dropped (0–1).
	Loss float64
	// Bandwidth caps each direction of the line, in bits per second (0:
	// no cap).
	Bandwidth int64
}

// Shaped says whether the link needs the user-space line (or a qdisc).
func (l Link) Shaped() bool { return l.RTT > 0 || l.Jitter > 0 || l.Loss > 0 || l.Bandwidth > 0 }

// Validate checks the link's figures.
func (l Link) Validate() error {
	switch {
	case l.RTT < 0 || l.RTT > 10*time.Second:
		return fmt.Errorf("rtt %v: want 0 to 10s", l.RTT)
	case l.Jitter < 0 || l.Jitter > l.RTT/2:
		return fmt.Errorf("jitter %v: want 0 to the one-way delay, rtt/2 (%v)", l.Jitter, l.RTT/2)
	case !(l.Loss >= 0 && l.Loss < 1):
		return fmt.Errorf("loss %v: want 0 to below 1", l.Loss)
	case l.Bandwidth < 0 || l.Bandwidth > 0 && l.Bandwidth < 64_000:
		return fmt.Errorf("bandwidth %d bit/s: want at least 64kbit", l.Bandwidth)
	}
	return nil
}

// ParseBandwidth parses a rate such as "10mbit", "512kbit", "1gbit" or a
// plain number of bits per second.
func ParseBandwidth(s string) (int64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("bandwidth %q: want a rate such as 10mbit, 512kbit or 1gbit", s)
	}
	return int64(v * float64(mult)), nil
}

// tbfArgs is the tc command that caps dev at bits per second: a bucket
// of at least 16 KiB (or 20 ms of the rate) and at most 100 ms queued.
func tbfArgs(dev string, bits int64) []string {
	burst := max(16<<10, bits/8/50)
	return []string{"qdisc", "add", "dev", dev, "root", "tbf", "rate", strconv.FormatInt(bits, 10) + "bit",
		"burst", strconv.FormatInt(burst, 10), "latency", "100ms"}
}

// openTUN creates the TUN device name in the calling thread's network
// namespace and returns its file (non-blocking, so that closing it ends a
// Read in progress). The device lives as long as the file is open.
func openTUN(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: TUNSETIFF: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "tun:"+name), nil
}

// LineStats counts what a home's line carried.
type LineStats struct {
	Out     int64 `json:"out"`
	In      int64 `json:"in"`
	Dropped int64 `json:"dropped"`
}

// line carries one home's packets between its TUN device (home side) and
// the router's: outgoing ones after the link's delay, incoming ones at once.
type line struct {
	home, router *os.File
	link         Link
	out, in      atomic.Int64
	dropped      atomic.Int64
	wg           sync.WaitGroup
	rng          *rand.Rand
}

// queueLen bounds the packets in flight on one line; more are dropped, as
// a router's full queue drops them.
const queueLen = 8192

// mtu is the TUN devices' MTU; reads use a buffer a little larger.
const mtu = 1500

type delayed struct {
	pkt []byte
	due time.Time
}

func startLine(home, router *os.File, l Link, seed uint64) *line {
	ln := &line{home: home, router: router, link: l, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
	q := make(chan delayed, queueLen)
	ln.wg.Add(3)
	go func() { // home → queue
		defer ln.wg.Done()
		defer close(q)
		var last time.Time
		for {
			buf := make([]byte, mtu+64)
			n, err := home.Read(buf)
			if err != nil {
				return
			}
			if n == 0 || buf[0]>>4 != 4 {
				continue // the topology is IPv4 only: the kernel's IPv6 chatter stays home
			}
			if l.Loss > 0 && ln.rng.Float64() < l.Loss {
				ln.dropped.Add(1)
				continue
			}
			wait := l.RTT / 2
			if l.Jitter > 0 {
				wait += time.Duration((ln.rng.Float64()*2 - 1) * float64(l.Jitter))
			}
			due := time.Now().Add(max(wait, 0))
			if due.Before(last) {
				due = last // a line does not reorder
			}
			last = due
			select {
			case q <- delayed{buf[:n], due}:
			default:
				ln.dropped.Add(1)
			}
		}
	}()
	go func() { // queue → router, each packet at its time
		defer ln.wg.Done()
		// Timers wake late (the poller counts in milliseconds): sleep less
		// by the lateness seen so far, so that packets leave on time.
		var late time.Duration
		for d := range q {
			if w := time.Until(d.due) - late; w > 0 {
				time.Sleep(w)
				// Steer: a late wake sleeps less next time, an early one more.
				late = max(0, min(late+time.Since(d.due)/8, 2*time.Millisecond))
			}
			// Sleeping less may wake before the packet's time: never
			// send it early (the rest is at most the 2 ms of steering).
			for time.Now().Before(d.due) {
				runtime.Gosched()
			}
			if _, err := router.Write(d.pkt); err != nil {
				if errors.Is(err, os.ErrClosed) {
					return
				}
				ln.dropped.Add(1)
				continue
			}
			ln.out.Add(1)
		}
	}()
	go func() { // router → home, at once
		defer ln.wg.Done()
		buf := make([]byte, mtu+64)
		for {
			n, err := router.Read(buf)
			if err != nil {
				return
			}
			if n == 0 || buf[0]>>4 != 4 {
				continue
			}
			if _, err := home.Write(buf[:n]); err != nil {
				if errors.Is(err, os.ErrClosed) {
					return
				}
				ln.dropped.Add(1)
				continue
			}
			ln.in.Add(1)
		}
	}()
	return ln
}

func (ln *line) stats() LineStats {
	return LineStats{Out: ln.out.Load(), In: ln.in.Load(), Dropped: ln.dropped.Load()}
}

// close ends the line and removes both TUN devices.
func (ln *line) close() error {
	err := errors.Join(ln.home.Close(), ln.router.Close())
	ln.wg.Wait()
	return err
}
