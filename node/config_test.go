package node

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/p2p"
)

// The commented config that init writes must say exactly what the code's
// defaults are.
func TestTemplateIsDefaultConfig(t *testing.T) {
	cfg, err := DecodeConfig([]byte(configTemplate))
	if err != nil {
		t.Fatal(err)
	}
	if want := DefaultConfig(); !reflect.DeepEqual(cfg, want) {
		t.Fatalf("template decodes to\n%+v\nwant DefaultConfig\n%+v", cfg, want)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("default config invalid: %v", err)
	}
	// Every key of Config is documented in the template.
	for _, key := range ConfigKeys() {
		leaf := key[strings.LastIndexByte(key, '.')+1:]
		if !strings.Contains(configTemplate, "\n"+leaf+" = ") {
			t.Errorf("key %s is missing from the config template", key)
		}
	}
}

func TestDecodeConfigErrors(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"unknown key", "[p2p]\nlisten = []\nlisen = []\n", `line 3 column 1: unknown key "p2p.lisen"`},
		{"unknown section", "[nope]\nx = 1\n", `unknown key "nope`},
		{"malformed", "[p2p\n", "line 1"},
		{"wrong type", "[p2p]\nlisten = 5\n", "line 2"},
		{"bad duration", "[gossip]\nheartbeat_interval = \"soon\"\n", "invalid duration"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeConfig([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		key    string
	}{
		{"no listen", func(c *Config) { c.P2P.Listen = nil }, "p2p.listen"},
		{"bad listen", func(c *Config) { c.P2P.Listen = []string{"/ip4/1.2.3.4/tcp/1", "/ip4/nope"} }, "p2p.listen[1]"},
		{"bootstrap without peer id", func(c *Config) { c.P2P.Bootstrap = []string{"/ip4/1.2.3.4/tcp/1"} }, "p2p.bootstrap[0]"},
		{"bad role", func(c *Config) { c.P2P.Roles = []string{"miner"} }, "p2p.roles[0]"},
		{"bad dht mode", func(c *Config) { c.P2P.DHT.Mode = "both" }, "p2p.dht.mode"},
		{"bad relay service", func(c *Config) { c.P2P.NAT.RelayService = "yes" }, "p2p.nat.relay_service"},
		{"bad reachability", func(c *Config) { c.P2P.NAT.Reachability = "hidden" }, "p2p.nat.reachability"},
		{"zero bootstrap timeout", func(c *Config) { c.P2P.BootstrapTimeout = 0 }, "p2p.bootstrap_timeout"},
		{"low above high", func(c *Config) { c.P2P.Limits.ConnsLow = 500 }, "p2p.limits.conns_low"},
		{"high above max", func(c *Config) { c.P2P.Limits.ConnsHigh = 1000 }, "p2p.limits.conns_high"},
		{"zero streams", func(c *Config) { c.P2P.Limits.MaxStreams = 0 }, "p2p.limits.max_streams"},
		{"fast heartbeat", func(c *Config) { c.Gossip.HeartbeatInterval = Duration(time.Millisecond) }, "gossip.heartbeat_interval"},
		{"expiry below interval", func(c *Config) { c.Gossip.PeerExpiry = Duration(time.Second) }, "gossip.peer_expiry"},
		{"public api", func(c *Config) { c.API.Listen = "0.0.0.0:5001" }, "api.listen"},
		{"api no port", func(c *Config) { c.API.Listen = "127.0.0.1" }, "api.listen"},
		{"api relative socket", func(c *Config) { c.API.Listen = "unix:api.sock" }, "api.listen"},
		{"bad level", func(c *Config) { c.Log.Level = "loud" }, "log.level"},
		{"bad format", func(c *Config) { c.Log.Format = "xml" }, "log.format"},
		{"bad speculate", func(c *Config) { c.Gating.Speculate = "lookahead" }, "gating.speculate"},
		{"draft without a model", func(c *Config) { c.Gating.Speculate = "draft" }, "gating.draft"},
		{"draft neither file nor cid", func(c *Config) { c.Gating.Speculate, c.Gating.Draft = "draft", "/no/such/draft.gguf" }, "gating.draft"},
		{"no draft tokens", func(c *Config) { c.Gating.SpeculateMax = 0 }, "gating.speculate_max"},
		{"negative batch wait", func(c *Config) { c.Gating.BatchWait = Duration(-time.Millisecond) }, "gating.batch_wait"},
		{"negative sessions", func(c *Config) { c.Gating.MaxSessions = -1 }, "gating.max_sessions"},
		{"negative lanes", func(c *Config) { c.Expert.Lanes = -1 }, "expert.lanes"},
		{"negative lane poll", func(c *Config) { c.Expert.LanePollUS = -1 }, "expert.lane_poll_us"},
		{"negative go procs", func(c *Config) { c.Expert.GoProcs = -1 }, "expert.go_procs"},
		{"lane poll over a second", func(c *Config) { c.Expert.LanePollUS = MaxLanePollUS + 1 }, "expert.lane_poll_us"},
		{"negative compute poll", func(c *Config) { c.Home.ComputePoll = -1 }, "home.compute_poll"},
		{"compute poll over ggml's levels", func(c *Config) { c.Home.ComputePoll = 101 }, "home.compute_poll"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tc.mutate(&cfg)
			err := cfg.Validate()
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Key != tc.key {
				t.Fatalf("error = %v, want a FieldError for %s", err, tc.key)
			}
		})
	}
}

// A draft model named by CID passes validation (it is fetched when the
// model loads), as a file does.
func TestValidateDraftByCID(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Gating.Speculate, cfg.Gating.Draft = "draft", "bafkreicvm5mlhmssm5dwbcgifdqvlbjjz2oxmqzjt5z27bxs6ypxpi4geu"
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestApplyEnv(t *testing.T) {
	env := map[string]string{
		"NEURO_P2P_LISTEN":                "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/udp/1/quic-v1",
		"NEURO_P2P_DHT_MODE":              "server",
		"NEURO_P2P_NAT_PORT_MAP":          "false",
		"NEURO_P2P_LIMITS_MAX_CONNS":      "900",
		"NEURO_GOSSIP_HEARTBEAT_INTERVAL": "2s",
	}
	cfg := DefaultConfig()
	src := Sources{}
	if err := ApplyEnv(&cfg, mapLookup(env), src); err != nil {
		t.Fatal(err)
	}
	if len(cfg.P2P.Listen) != 2 || cfg.P2P.Listen[1] != "/ip4/127.0.0.1/udp/1/quic-v1" {
		t.Errorf("listen = %q", cfg.P2P.Listen)
	}
	if cfg.P2P.DHT.Mode != "server" || cfg.P2P.NAT.PortMap || cfg.P2P.Limits.MaxConns != 900 ||
		cfg.Gossip.HeartbeatInterval != Duration(2*time.Second) {
		t.Errorf("env not applied: %+v", cfg)
	}
	if src["p2p.dht.mode"] != "NEURO_P2P_DHT_MODE" || len(src) != len(env) {
		t.Errorf("sources = %v", src)
	}

	for name, val := range map[string]string{
		"NEURO_P2P_NAT_PORT_MAP":          "maybe",
		"NEURO_P2P_LIMITS_MAX_CONNS":      "many",
		"NEURO_GOSSIP_HEARTBEAT_INTERVAL": "often",
	} {
		cfg := DefaultConfig()
		err := ApplyEnv(&cfg, mapLookup(map[string]string{name: val}), Sources{})
		if err == nil || !strings.HasPrefix(err.Error(), name+": ") {
			t.Errorf("%s=%s: error = %v, want one naming the variable", name, val, err)
		}
	}
}

// A bad value is blamed on where it came from.
func TestSourcesDescribe(t *testing.T) {
	cfg := DefaultConfig()
	cfg.P2P.Listen = []string{"/ip4/bad"}
	err := cfg.Validate()
	got := Sources{"p2p.listen": "flag --listen"}.Describe(err, "/h/config.toml").Error()
	if !strings.HasPrefix(got, "flag --listen: ") || !strings.Contains(got, "invalid multiaddr") {
		t.Errorf("flag source: %q", got)
	}
	got = Sources{}.Describe(err, "/h/config.toml").Error()
	if !strings.HasPrefix(got, "config /h/config.toml: p2p.listen[0]: ") {
		t.Errorf("file source: %q", got)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadConfig(filepath.Join(dir, "missing.toml")); !errors.Is(err, ErrNotInitialized) {
		t.Errorf("missing file: %v", err)
	}
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte("[p2p]\nbootstrap = [\"/ip4/1.2.3.4/tcp/1\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadConfig(path)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "p2p.bootstrap[0]") {
		t.Errorf("invalid value: %v", err)
	}
}

func TestToP2P(t *testing.T) {
	cfg := DefaultConfig()
	cfg.P2P.Roles = []string{"expert", "relay"}
	pc, err := cfg.ToP2P()
	if err != nil {
		t.Fatal(err)
	}
	if len(pc.Listen) != 2 || len(pc.Roles) != 2 || pc.Limits.MaxMemory != 1024<<20 || pc.HeartbeatInterval != 5*time.Second ||
		pc.Reachability != p2p.ReachAuto {
		t.Fatalf("ToP2P = %+v", pc)
	}
	cfg.P2P.NAT.Reachability = "private"
	if pc, err := cfg.ToP2P(); err != nil || pc.Reachability != p2p.ReachPrivate {
		t.Fatalf("reachability private: %v, %v", pc.Reachability, err)
	}
}

func mapLookup(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

// FuzzDecodeConfig: no input crashes the config decoder or validator.
func FuzzDecodeConfig(f *testing.F) {
	f.Add([]byte(configTemplate))
	f.Add([]byte("[p2p]\nlisten = [\"/ip4/1.2.3.4/tcp/1\"]\n"))
	f.Add([]byte("[[x]]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := DecodeConfig(data)
		if err != nil {
			return
		}
		if cfg.Validate() == nil {
			if _, err := cfg.ToP2P(); err != nil {
				t.Fatalf("valid config does not convert: %v", err)
			}
		}
	})
}

// home.threads caps the expert lanes' threads in all (lanes × threads),
// as it caps each component's threads; without it lanes stay as set.
func TestCapLanes(t *testing.T) {
	for _, c := range []struct{ lanes, threads, limit, want int }{
		{0, 1, 0, 0}, {4, 1, 0, 4}, {1, 2, 1, 1}, {4, 1, 2, 2}, {4, 2, 4, 2}, {4, 3, 2, 1}, {2, 1, 8, 2},
	} {
		if got := capLanes(c.lanes, c.threads, c.limit); got != c.want {
			t.Errorf("capLanes(%d lanes, %d threads, home.threads %d) = %d, want %d", c.lanes, c.threads, c.limit, got, c.want)
		}
	}
}
