package node

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/neuro-p2p/neuro/metrics"
)

// LoadSample is one reading of how busy the machine is.
type LoadSample struct {
	// Others is the CPU that processes other than this one used since the
	// last sample, as a fraction of all cores (0 to 1).
	Others float64
	// Load1PerCore is the 1-minute load average divided by the cores.
	Load1PerCore float64
	// GPUInUse: another process holds a GPU.
	GPUInUse bool
}

// LoadSignal samples the machine's load. The default reads /proc and
// nvidia-smi; tests inject their own (WithLoadSignal).
type LoadSignal func() (LoadSample, error)

// resumeAfter is how many idle samples in a row resume expert work.
const resumeAfter = 3

// idleGuard pauses expert work while the machine is busy with its owner's
// work (home.idle_only) or over home.max_load, and resumes it once the
// machine has been idle for resumeAfter samples. Paused nodes say so in
// their heartbeats, and their expert server answers busy.
type idleGuard struct {
	cfg     HomeConfig
	sample  LoadSignal
	setExp  func(bool)
	metrics *metrics.Metrics
	log     *slog.Logger

	paused atomic.Bool
	mu     sync.Mutex
	idle   int    // idle samples in a row
	reason string // why paused
}

func newIdleGuard(cfg HomeConfig, sample LoadSignal, setExpert func(bool), m *metrics.Metrics, log *slog.Logger) *idleGuard {
	if sample == nil {
		sample = newProcLoad().sample
	}
	return &idleGuard{cfg: cfg, sample: sample, setExp: setExpert, metrics: m, log: log}
}

func (g *idleGuard) enabled() bool { return g.cfg.IdleOnly || g.cfg.MaxLoad > 0 }

// Paused reports whether expert work is paused (false on a nil guard).
func (g *idleGuard) Paused() bool { return g != nil && g.paused.Load() }

// Reason says why expert work is paused ("" when it is not).
func (g *idleGuard) Reason() string {
	if g == nil {
		return ""
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.reason
}

func (g *idleGuard) run(ctx context.Context) {
	t := time.NewTicker(time.Duration(g.cfg.IdleCheck))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s, err := g.sample()
			if err != nil {
				g.log.Debug("load sample", "err", err)
				continue
			}
			g.observe(s)
		}
	}
}

// busy says why s is too busy for expert work, or "".
func (g *idleGuard) busy(s LoadSample) string {
	switch {
	case g.cfg.IdleOnly && s.GPUInUse:
		return "another process uses the GPU"
	case g.cfg.IdleOnly && s.Others > g.cfg.IdleThreshold:
		return fmt.Sprintf("other processes use %.0f%% of the CPU (idle_threshold %.0f%%)", 100*s.Others, 100*g.cfg.IdleThreshold)
	case g.cfg.MaxLoad > 0 && s.Load1PerCore > g.cfg.MaxLoad:
		return fmt.Sprintf("load %.2f per core (max_load %.2f)", s.Load1PerCore, g.cfg.MaxLoad)
	}
	return ""
}

// observe takes one sample: busy pauses at once; resumeAfter idle samples
// in a row resume.
func (g *idleGuard) observe(s LoadSample) {
	g.mu.Lock()
	defer g.mu.Unlock()
	why := g.busy(s)
	switch {
	case why != "":
		g.idle = 0
		if !g.paused.Load() {
			g.paused.Store(true)
			g.reason = why
			g.setExp(true)
			g.metrics.IdlePaused(true)
			g.log.Info("expert work paused", "why", why)
		}
	case g.paused.Load():
		g.idle++
		if g.idle >= resumeAfter {
			g.paused.Store(false)
			g.reason = ""
			g.setExp(false)
			g.metrics.IdlePaused(false)
			g.log.Info("expert work resumed: the machine is idle")
		}
	}
}

// procLoad reads the machine's CPU use from /proc/stat, this process's
// from /proc/self/stat, and asks nvidia-smi (if there is one) which
// processes use a GPU.
type procLoad struct {
	lastTotal, lastIdle, lastSelf uint64
	smi                           string
}

func newProcLoad() *procLoad {
	p := &procLoad{}
	p.smi, _ = exec.LookPath("nvidia-smi")
	p.lastTotal, p.lastIdle, _ = cpuTimes()
	p.lastSelf, _ = selfTicks()
	return p
}

func (p *procLoad) sample() (LoadSample, error) {
	total, idle, err := cpuTimes()
	if err != nil {
		return LoadSample{}, err
	}
	self, err := selfTicks()
	if err != nil {
		return LoadSample{}, err
	}
	var s LoadSample
	if dt := total - p.lastTotal; dt > 0 {
		busy := float64(dt-(idle-p.lastIdle)) - float64(self-p.lastSelf)
		s.Others = max(0, busy/float64(dt))
	}
	p.lastTotal, p.lastIdle, p.lastSelf = total, idle, self
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			l, _ := strconv.ParseFloat(f[0], 64)
			s.Load1PerCore = l / float64(runtime.NumCPU())
		}
	}
	if p.smi != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		out, err := exec.CommandContext(ctx, p.smi, "--query-compute-apps=pid", "--format=csv,noheader").Output()
		cancel()
		if err == nil {
			me := strconv.Itoa(os.Getpid())
			for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
				if l = strings.TrimSpace(l); l != "" && l != me {
					s.GPUInUse = true
				}
			}
		}
	}
	return s, nil
}

// cpuTimes returns the machine's total and idle CPU time in clock ticks
// (the first line of /proc/stat; idle includes iowait).
func cpuTimes() (total, idle uint64, err error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0, 0, fmt.Errorf("/proc/stat: empty")
	}
	fields := strings.Fields(sc.Text())
	if len(fields) < 6 || fields[0] != "cpu" {
		return 0, 0, fmt.Errorf("/proc/stat: unexpected first line %q", sc.Text())
	}
	for i, v := range fields[1:] {
		n, _ := strconv.ParseUint(v, 10, 64)
		if i >= 7 { // guest time is already in user
			break
		}
		total += n
		if i == 3 || i == 4 {
			idle += n
		}
	}
	return total, idle, nil
}

// selfTicks is this process's user and system CPU time in clock ticks.
func selfTicks() (uint64, error) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: count from after it.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/self/stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/self/stat: %d fields", len(f))
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	s, _ := strconv.ParseUint(f[12], 10, 64)
	return u + s, nil
}
