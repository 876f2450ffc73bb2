package ledger

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
)

// FreePort finds a free loopback port for a listener whose port must be
// known before it starts, such as a validator's CometBFT p2p (the others'
// peer lists name it). It is drawn below the kernel's ephemeral range: a
// port the kernel hands out for port 0 could be taken meanwhile by another
// listener on port 0 or by an outgoing connection's local port (another
// validator's, while this one is down and about to restart on it), and the
// bind would then fail. Only when no such port is free does it fall back to
// port 0.
func FreePort() (int, error) {
	low := ephemeralLow()
	const from = 10000
	for range 200 {
		if low <= from {
			break
		}
		port := from + rand.IntN(low-from)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			l.Close()
			return port, nil
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("ledger: a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// ephemeralLow is the first port of the kernel's ephemeral range (Linux's
// default when it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n < 1024 {
		return 32768
	}
	return n
}
