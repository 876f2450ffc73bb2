package p2p

import (
	"net"
	"net/netip"
	"sync"
	"time"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// OnThisMachine reports whether a connection's remote address a is on
// this machine: a loopback address, or an address of one of its network
// interfaces (a peer dialled at the machine's own LAN address). A
// relayed address never is.
func OnThisMachine(a ma.Multiaddr) bool {
	if a == nil || isCircuit(a) {
		return false
	}
	ip, err := manet.ToIP(a)
	if err != nil {
		return false
	}
	if ip.IsLoopback() {
		return true
	}
	addr, ok := netip.AddrFromSlice(ip)
	if !ok {
		return false
	}
	return ownAddrs.has(addr.Unmap())
}

// ownAddrs caches the machine's interface addresses, read again at most
// every ownAddrsTTL (interfaces come and go).
var ownAddrs = &addrCache{}

const ownAddrsTTL = 10 * time.Second

type addrCache struct {
	mu    sync.Mutex
	read  time.Time
	addrs map[netip.Addr]bool
}

func (c *addrCache) has(a netip.Addr) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.addrs == nil || time.Since(c.read) > ownAddrsTTL {
		c.addrs, c.read = map[netip.Addr]bool{}, time.Now()
		ifaddrs, err := net.InterfaceAddrs()
		if err == nil {
			for _, ia := range ifaddrs {
				if p, err := netip.ParsePrefix(ia.String()); err == nil {
					c.addrs[p.Addr().Unmap()] = true
				}
			}
		}
	}
	return c.addrs[a]
}
