package neuropb

import (
	"errors"
	"fmt"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// ErrInvalid is wrapped by every validation error of this package.
var ErrInvalid = errors.New("invalid message")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Validate checks every field of a decoded Heartbeat against its limits.
// It does not check that PeerId matches the gossip signer; the topic
// validator does that.
func (h *Heartbeat) Validate() error {
	if h == nil {
		return invalid("heartbeat: nil")
	}
	if _, err := peer.IDFromBytes(h.GetPeerId()); err != nil {
		return invalid("heartbeat: peer_id: %v", err)
	}
	if len(h.GetRoles()) > MaxRoles {
		return invalid("heartbeat: %d roles, at most %d", len(h.GetRoles()), MaxRoles)
	}
	for _, r := range h.GetRoles() {
		if _, ok := Role_name[int32(r)]; !ok || r == Role_ROLE_UNSPECIFIED {
			return invalid("heartbeat: unknown role %d", int32(r))
		}
	}
	if len(h.GetVersion()) > MaxVersionLen {
		return invalid("heartbeat: version is %d bytes, at most %d", len(h.GetVersion()), MaxVersionLen)
	}
	if len(h.GetAddrs()) > MaxHeartbeatAddrs {
		return invalid("heartbeat: %d addrs, at most %d", len(h.GetAddrs()), MaxHeartbeatAddrs)
	}
	for i, a := range h.GetAddrs() {
		if len(a) > MaxAddrLen {
			return invalid("heartbeat: addrs[%d] is %d bytes, at most %d", i, len(a), MaxAddrLen)
		}
		if _, err := ma.NewMultiaddrBytes(a); err != nil {
			return invalid("heartbeat: addrs[%d]: %v", i, err)
		}
	}
	return nil
}

// RoleString is the short lower-case name of a role ("expert").
func RoleString(r Role) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "ROLE_"))
}

// ParseRole is the inverse of RoleString.
func ParseRole(s string) (Role, error) {
	v, ok := Role_value["ROLE_"+strings.ToUpper(s)]
	if !ok || Role(v) == Role_ROLE_UNSPECIFIED {
		return 0, fmt.Errorf("unknown role %q (want one of %s)", s, strings.Join(RoleNames(), ", "))
	}
	return Role(v), nil
}

// RoleNames lists the valid role names in enum order.
func RoleNames() []string {
	var out []string
	for i := int32(1); ; i++ {
		if _, ok := Role_name[i]; !ok {
			return out
		}
		out = append(out, RoleString(Role(i)))
	}
}
