package p2p

import (
	"net"
	"net/netip"
	"testing"

	ma "github.com/multiformats/go-multiaddr"
)

func TestOnThisMachine(t *testing.T) {
	// An address of one of this machine's interfaces other than loopback,
	// if it has one.
	own := ""
	ifaddrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, ia := range ifaddrs {
		if p, err := netip.ParsePrefix(ia.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			own = p.Addr().String()
			break
		}
	}
	for _, c := range []struct {
		addr string
		want bool
	}{
		{"/ip4/127.0.0.1/tcp/4001", true},
		{"/ip4/127.0.0.1/udp/4001/quic-v1", true},
		{"/ip6/::1/tcp/4001", true},
		{"/ip4/203.0.113.9/tcp/4001", false}, // TEST-NET-3: no one's interface
		{"/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit", false},
		{"/dns4/localhost/tcp/4001", false}, // a name, not an address
	} {
		if got := OnThisMachine(ma.StringCast(c.addr)); got != c.want {
			t.Errorf("OnThisMachine(%s) = %v, want %v", c.addr, got, c.want)
		}
	}
	if own == "" {
		t.Log("no non-loopback IPv4 interface: skipping the own-address case")
		return
	}
	if a := ma.StringCast("/ip4/" + own + "/tcp/4001"); !OnThisMachine(a) {
		t.Errorf("OnThisMachine(%s) = false for this machine's interface address", a)
	}
	if OnThisMachine(nil) {
		t.Error("OnThisMachine(nil) = true")
	}
}
