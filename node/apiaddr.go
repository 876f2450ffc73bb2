package node

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
)

// The control API listens on a loopback host:port or, with the prefix
// unixPrefix, on a Unix socket. A socket is reachable by path from any
// network namespace (the netns testnet's launcher talks to nodes that way)
// and only by whom its file mode lets in.
const unixPrefix = "unix:"

// listenAPI opens the control API's listener.
func listenAPI(spec string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(spec, unixPrefix); ok {
		// A socket left by a node that died is in the way; the home's lock
		// says no live node uses it.
		if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
			return nil, err
		}
		ln, err := net.Listen("unix", path)
		if err != nil {
			return nil, err
		}
		if err := os.Chmod(path, 0o600); err != nil {
			ln.Close()
			return nil, err
		}
		return ln, nil
	}
	return net.Listen("tcp", spec)
}

// apiAddrOf is how clients name a listener: host:port, or unix:PATH.
func apiAddrOf(ln net.Listener) string {
	if ln.Addr().Network() == "unix" {
		return unixPrefix + ln.Addr().String()
	}
	return ln.Addr().String()
}

var (
	clientsMu sync.Mutex
	clients   = map[string]*http.Client{}
)

// apiURL returns the client and URL for path on the control API at addr
// (host:port or unix:PATH).
func apiURL(addr, path string) (*http.Client, string) {
	sock, ok := strings.CutPrefix(addr, unixPrefix)
	if !ok {
		return http.DefaultClient, "http://" + addr + path
	}
	clientsMu.Lock()
	defer clientsMu.Unlock()
	c := clients[sock]
	if c == nil {
		c = &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		}}
		clients[sock] = c
	}
	return c, "http://neurod" + path
}

// apiDo sends req, built for url from apiURL, with the client for addr.
func apiDo(addr string, req *http.Request) (*http.Response, error) {
	c, _ := apiURL(addr, "")
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("control API %s: %w", addr, err)
	}
	return resp, nil
}
