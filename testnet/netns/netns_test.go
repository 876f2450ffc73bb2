package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

func needNamespaces(t *testing.T) {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("NEURO_REQUIRE_NETNS") != "" {
			t.Fatalf("network namespaces: %v", err)
		}
		t.Skipf("network namespaces unavailable here: %v", err)
	}
}

// udpEcho listens on a public host and answers each datagram with the
// address it came from, as the public segment saw it.
func udpEcho(t *testing.T, h Host, port int) {
	t.Helper()
	var conn net.PacketConn
	if err := h.Do(func() (err error) {
		conn, err = net.ListenPacket("udp4", fmt.Sprintf("%s:%d", h.IP, port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 64)
		for {
			_, from, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = conn.WriteTo([]byte(from.String()), from)
		}
	}()
}

// observed sends from one UDP socket in home h to each of the servers and
// returns how each saw the sender.
func observed(t *testing.T, h Host, servers ...string) []string {
	t.Helper()
	var out []string
	err := h.Do(func() error {
		conn, err := net.ListenPacket("udp4", ":0")
		if err != nil {
			return err
		}
		defer conn.Close()
		for _, s := range servers {
			to, err := net.ResolveUDPAddr("udp4", s)
			if err != nil {
				return err
			}
			buf := make([]byte, 64)
			var got string
			for try := 0; try < 5 && got == ""; try++ { // bounded: UDP may drop
				if _, err := conn.WriteTo([]byte("who am i"), to); err != nil {
					return err
				}
				_ = conn.SetReadDeadline(time.Now().Add(time.Second))
				if n, _, err := conn.ReadFrom(buf); err == nil {
					got = string(buf[:n])
				}
			}
			if got == "" {
				return fmt.Errorf("no answer from %s", s)
			}
			out = append(out, got)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// A topology of one public host and two homes (cone, symmetric): homes
// reach the public host through their NAT, which shows the router's
// address; a cone NAT keeps one mapping for every destination and a
// symmetric one makes a new one per destination; nothing reaches into a
// home unasked; and the topology is sealed: no namespace has a default
// route out, and a dial to an address outside fails at once. Close and
// Cleanup leave no namespace behind.
func TestTopology(t *testing.T) {
	needNamespaces(t)
	ctx := context.Background()
	prefix := fmt.Sprintf("nt%d", os.Getpid()%100000)
	n, err := Create(ctx, Topology{Prefix: prefix, Publics: 1, Homes: []NAT{Cone, Symmetric}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	pub := n.Publics[0]
	udpEcho(t, pub, 4001)
	udpEcho(t, pub, 4002)
	servers := []string{pub.IP.String() + ":4001", pub.IP.String() + ":4002"}

	for _, h := range n.Homes {
		got := observed(t, h.Host, servers...)
		var ports []string
		for _, g := range got {
			host, port, _ := net.SplitHostPort(g)
			if host != h.Router.IP.String() {
				t.Fatalf("%s home: the public host saw %s, want the router's address %s", h.NAT, g, h.Router.IP)
			}
			ports = append(ports, port)
		}
		same := ports[0] == ports[1]
		if (h.NAT == Cone) != same {
			t.Fatalf("%s NAT: mappings %v (same for both destinations: %v)", h.NAT, got, same)
		}
		t.Logf("%s NAT: %v", h.NAT, got)
	}

	// Hole punching by hand: two homes send UDP to each other's public
	// mapping at once. Between two cone NATs the packets get through;
	// a symmetric NAT maps the punch to another port, so they do not.
	punch := func(a, b Home, port int) (got int) {
		var ca, cb net.PacketConn
		for _, x := range []struct {
			h Home
			c *net.PacketConn
		}{{a, &ca}, {b, &cb}} {
			if err := x.h.Do(func() (err error) {
				*x.c, err = net.ListenPacket("udp4", fmt.Sprintf(":%d", port))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer (*x.c).Close()
		}
		toA := &net.UDPAddr{IP: a.Router.IP, Port: port}
		toB := &net.UDPAddr{IP: b.Router.IP, Port: port}
		for range 5 { // bounded
			_, _ = ca.WriteTo([]byte("punch"), toB)
			_, _ = cb.WriteTo([]byte("punch"), toA)
			time.Sleep(50 * time.Millisecond)
		}
		buf := make([]byte, 16)
		for _, c := range []net.PacketConn{ca, cb} {
			_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			if _, _, err := c.ReadFrom(buf); err == nil {
				got++
			}
		}
		return got
	}
	cones, err := Create(ctx, Topology{Prefix: prefix + "c", Publics: 1, Homes: []NAT{Cone, Cone, Symmetric, Symmetric}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cones.Close() })
	if got := punch(cones.Homes[0], cones.Homes[1], 4101); got != 2 {
		t.Fatalf("cone to cone: %d of 2 homes heard the other", got)
	}
	if got := punch(cones.Homes[2], cones.Homes[3], 4102); got != 0 {
		t.Fatalf("symmetric to symmetric: %d of 2 homes heard the other", got)
	}

	// Unasked traffic into a home: the public host has no route to the
	// home's network, and a router drops what comes in unasked.
	err = pub.Do(func() error {
		c, err := net.DialTimeout("tcp", n.Homes[0].IP.String()+":22", 2*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err == nil {
		t.Fatal("a public host reached into a home")
	}

	// Sealed: no default route but the homes' (to their router), and a
	// dial to an address outside the topology fails at once.
	for _, ns := range n.Namespaces() {
		out, err := exec.Command("ip", "-n", ns, "route", "show", "default").Output()
		if err != nil {
			t.Fatal(err)
		}
		isHome := strings.Contains(ns, "-home")
		if has := strings.TrimSpace(string(out)) != ""; has != isHome {
			t.Fatalf("namespace %s: default route %q", ns, out)
		}
	}
	outside := []string{"192.0.2.1:80", "8.8.8.8:53"}
	if addrs, err := net.InterfaceAddrs(); err == nil { // this machine's own addresses
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
				outside = append(outside, net.JoinHostPort(ipn.IP.String(), "22"))
			}
		}
	}
	for _, h := range []Host{pub, n.Homes[0].Host, n.Homes[1].Router} {
		for _, addr := range outside {
			start := time.Now()
			err := h.Do(func() error {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err == nil {
					c.Close()
				}
				return err
			})
			var ne net.Error
			if err == nil || (errors.As(err, &ne) && ne.Timeout()) ||
				!(errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTUNREACH)) {
				t.Fatalf("%s: dial %s: %v after %v (want unreachable at once)", h.NS, addr, err, time.Since(start))
			}
		}
	}

	// Close removes everything; Cleanup removes what a crashed run left.
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	left, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(left), prefix+"-") {
		t.Fatalf("namespaces left after Close:\n%s", left)
	}
	crashed, err := Create(ctx, Topology{Prefix: prefix, Publics: 1, Homes: []NAT{Cone}})
	if err != nil {
		t.Fatal(err)
	}
	_ = crashed // its run "crashes": nobody calls Close
	if err := Cleanup(ctx, prefix); err != nil {
		t.Fatal(err)
	}
	left, _ = exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(left), prefix+"-") {
		t.Fatalf("namespaces left after Cleanup:\n%s", left)
	}
}

// A shaped line: packets from a home wait RTT/2 on its line, so a ping
// from a home to a public host never comes back sooner than that; a lossy
// line drops some of them and counts what it dropped; a capped line does
// not carry a bulk transfer faster than its rate. (Only lower bounds are
// checked: a busy machine may add time, never take it away.)
func TestShapedLink(t *testing.T) {
	needNamespaces(t)
	ctx := context.Background()
	prefix := fmt.Sprintf("nl%d", os.Getpid()%100000)
	// One line per home: 40 ms ± 2 ms, and 80 ms.
	links := []Link{{RTT: 40 * time.Millisecond, Jitter: 2 * time.Millisecond}, {RTT: 80 * time.Millisecond}}
	n, err := Create(ctx, Topology{Prefix: prefix, Publics: 1, Homes: []NAT{Cone, Symmetric}, Links: links})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	pub := n.Publics[0]
	for i, h := range n.Homes {
		rtts, err := h.Ping(ctx, pub.IP, 10, 20*time.Millisecond, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		delay := links[i].RTT / 2
		if rtts[0] < delay-links[i].Jitter {
			t.Fatalf("%s home: ping %v, below the line's delay %v", h.NAT, rtts, delay)
		}
		t.Logf("%s home to public host: median %v (line delay %v ± %v)", h.NAT, rtts[len(rtts)/2], delay, links[i].Jitter)
	}
	// The line carries NAT traffic both ways: the UDP echo answers.
	udpEcho(t, pub, 4001)
	if got := observed(t, n.Homes[0].Host, pub.IP.String()+":4001"); !strings.HasPrefix(got[0], n.Homes[0].Router.IP.String()+":") {
		t.Fatalf("echo through the shaped line: %v", got)
	}
	st := n.LineStats()
	if len(st) != 2 || st[0].Out < 10 || st[0].In < 10 || st[0].Dropped != 0 {
		t.Fatalf("line stats %+v", st)
	}

	lossy, err := Create(ctx, Topology{Prefix: prefix + "l", Publics: 1, Homes: []NAT{Cone},
		Links: []Link{{RTT: 2 * time.Millisecond, Loss: 0.5, Bandwidth: 8_000_000}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lossy.Close() })
	rtts, err := lossy.Homes[0].Ping(ctx, lossy.Publics[0].IP, 40, time.Millisecond, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if d := lossy.LineStats()[0].Dropped; len(rtts) == 40 || d == 0 {
		t.Fatalf("50%% loss: %d of 40 pings answered, %d packets dropped", len(rtts), d)
	}
	t.Logf("50%% loss: %d of 40 pings answered", len(rtts))

	// 2 MB through an 8 Mbit/s line takes at least 2 s (less the bucket).
	capped, err := Create(ctx, Topology{Prefix: prefix + "b", Publics: 1, Homes: []NAT{Cone}, Links: []Link{{Bandwidth: 8_000_000}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { capped.Close() })
	cpub := capped.Publics[0]
	var ln net.Listener
	if err := cpub.Do(func() (err error) { ln, err = net.Listen("tcp4", cpub.IP.String()+":5001"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const size = 2 << 20
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		var total int64
		buf := make([]byte, 64<<10)
		for {
			k, err := c.Read(buf)
			total += int64(k)
			if err != nil {
				got <- total
				return
			}
		}
	}()
	start := time.Now()
	if err := capped.Homes[0].Do(func() error {
		c, err := net.DialTimeout("tcp4", cpub.IP.String()+":5001", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		_, err = c.Write(make([]byte, size))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if n := <-got; n != size {
		t.Fatalf("received %d of %d bytes", n, size)
	}
	took := time.Since(start)
	if min := 1800 * time.Millisecond; took < min {
		t.Fatalf("2 MB through an 8 Mbit/s line in %v: faster than the cap allows (%v)", took, min)
	}
	t.Logf("2 MB through an 8 Mbit/s line: %v (%.1f Mbit/s)", took, float64(size*8)/took.Seconds()/1e6)
}
