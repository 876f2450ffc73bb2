package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// Ping sends count ICMP echo requests from the host to ip, one every
// interval, waiting up to wait for each answer, and returns the round
// trips of those answered, sorted. It fails when none is answered.
func (h Host) Ping(ctx context.Context, ip net.IP, count int, interval, wait time.Duration) ([]time.Duration, error) {
	if count < 1 || count > 1000 {
		return nil, fmt.Errorf("ping: count %d: want 1 to 1000", count)
	}
	var c *icmp.PacketConn
	if err := h.Do(func() (err error) {
		c, err = icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	}); err != nil {
		return nil, fmt.Errorf("ping from %s: %w", h.NS, err)
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	var rtts []time.Duration
	buf := make([]byte, 1500)
	for seq := range count {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("neuro testnet")}}
		b, err := msg.Marshal(nil)
		if err != nil {
			return nil, err
		}
		sent := time.Now()
		if _, err := c.WriteTo(b, &net.IPAddr{IP: ip}); err != nil {
			return nil, fmt.Errorf("ping %s from %s: %w", ip, h.NS, err)
		}
		_ = c.SetReadDeadline(sent.Add(wait))
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break // lost: go on with the next
				}
				return nil, fmt.Errorf("ping %s from %s: %w", ip, h.NS, err)
			}
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id && e.Seq == seq && from.String() == ip.String() {
				rtts = append(rtts, time.Since(sent))
				break
			}
		}
		if w := time.Until(sent.Add(interval)); w > 0 && seq < count-1 {
			time.Sleep(w)
		}
	}
	if len(rtts) == 0 {
		return nil, fmt.Errorf("ping %s from %s: no answer to %d requests", ip, h.NS, count)
	}
	slices.Sort(rtts)
	return rtts, nil
}
