package testnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/neuro-p2p/neuro/node"
)

// LaunchOptions configures Launch.
type LaunchOptions struct {
	// Nodes is how many neurod processes to start (at least 1).
	Nodes int
	// Dir holds one home per node (node-0, node-1, ...). Homes already
	// there are reused, so peer IDs stay the same across runs.
	Dir string
	// Binary is the neurod executable to run.
	Binary string
	// Timeout bounds the start and the health check.
	Timeout time.Duration
	Log     *slog.Logger
	// Args, if set, gives extra `neurod run` flags for node i.
	Args func(i int) []string
	// Config, if set, adjusts node i's config when its home is made.
	Config func(i int, cfg *node.Config)
	// Wrap, if set, gives a command that runs node i's neurod (e.g.
	// ip netns exec NS): the node runs as Wrap(i)... BINARY ARGS.
	Wrap func(i int) []string
	// BootAddrs, if set, picks the bootstrap node's addresses the others
	// dial (default: all it listens on).
	BootAddrs func(addrs []string) []string
	// Up, if set, is told how many nodes are up (their API answers) as
	// each comes up.
	Up func(n int)
	// BeforeStart, if set, runs once every home exists and before any
	// process starts (to import a model into a node's store).
	BeforeStart func(homes []string) error
}

// Process is one running neurod of a testnet.
type Process struct {
	Index   int
	Home    string
	LogPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	exitErr error         // valid after done
	killed  bool          // ended by Kill

	// Set once its control API answers.
	APIAddr string
	Status  node.Status
}

// Network is a running multi-process testnet.
type Network struct {
	opts  LaunchOptions
	log   *slog.Logger
	procs []*Process
	// Took is how long the network took from the first process start until
	// it was healthy.
	Took time.Duration
}

// Launch starts opts.Nodes neurod processes on 127.0.0.1: node 0 first, as
// the bootstrap and relay node, then the others, which know only node 0's
// address. It returns once every node answers on its control API; call
// WaitHealthy next. On error, every process it started has been stopped.
func Launch(ctx context.Context, opts LaunchOptions) (_ *Network, err error) {
	if opts.Nodes < 1 {
		return nil, fmt.Errorf("testnet: --nodes %d: need at least 1", opts.Nodes)
	}
	if opts.Binary == "" {
		return nil, errors.New("testnet: no neurod binary")
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 60 * time.Second
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	nw := &Network{opts: opts, log: opts.Log}
	defer func() {
		if err != nil {
			nw.Stop()
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	var homes []string
	for i := 0; i < opts.Nodes; i++ {
		home := Home(opts.Dir, i)
		var adjust func(*node.Config)
		if opts.Config != nil {
			adjust = func(c *node.Config) { opts.Config(i, c) }
		}
		if err := prepareHome(home, i == 0, adjust); err != nil {
			return nil, fmt.Errorf("testnet: node %d: %w", i, err)
		}
		homes = append(homes, home)
		nw.procs = append(nw.procs, &Process{Index: i, Home: home, LogPath: filepath.Join(home, "neurod.log")})
	}
	if opts.BeforeStart != nil {
		if err := opts.BeforeStart(homes); err != nil {
			return nil, fmt.Errorf("testnet: %w", err)
		}
	}
	start := time.Now()
	boot := nw.procs[0]
	if err := nw.start(boot, nil); err != nil {
		return nil, err
	}
	if err := nw.waitAPI(ctx, boot); err != nil {
		return nil, err
	}
	var upCount atomic.Int32
	up := func() {
		if opts.Up != nil {
			opts.Up(int(upCount.Add(1)))
		}
	}
	up()
	addrs := boot.Status.Addrs
	if opts.BootAddrs != nil {
		addrs = opts.BootAddrs(addrs)
	}
	var bootAddrs []string
	for _, a := range addrs {
		bootAddrs = append(bootAddrs, a+"/p2p/"+boot.Status.PeerID)
	}
	for _, p := range nw.procs[1:] {
		if err := nw.start(p, bootAddrs); err != nil {
			return nil, err
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(nw.procs))
	for i, p := range nw.procs[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = nw.waitAPI(ctx, p); errs[i] == nil {
				up()
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	nw.Took = time.Since(start)
	return nw, nil
}

// Home is node i's home in a testnet directory.
func Home(dir string, i int) string { return filepath.Join(dir, fmt.Sprintf("node-%d", i)) }

// prepareHome makes a node's home unless it exists, with the loopback
// config; the bootstrap node also serves as the testnet's relay.
func prepareHome(home string, bootstrap bool, adjust func(*node.Config)) error {
	if _, err := os.Stat(filepath.Join(home, node.IdentityFile)); err != nil {
		if _, err := node.Init(home, false); err != nil {
			return err
		}
	}
	// The config is rewritten on every launch: a reused home keeps its
	// identity and store, and gets this launch's settings.
	cfg := LoopbackConfig()
	cfg.Log.Format = "json"
	if bootstrap {
		cfg.P2P.Roles = []string{"bootstrap", "relay"}
		cfg.P2P.NAT.RelayService = "on"
	}
	if adjust != nil {
		adjust(&cfg)
	}
	body, err := toml.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("encode config: %w", err)
	}
	header := "# Written by 'neurod testnet': a node of a local test network on 127.0.0.1.\n" +
		"# See 'neurod init' for a commented config of every key.\n\n"
	return node.WriteFileAtomic(filepath.Join(home, node.ConfigFile), append([]byte(header), body...), 0o644)
}

// start runs one neurod process. It dies with the launcher (parent-death
// signal) and has its own process group, so that Ctrl-C on the terminal
// reaches only the launcher, which then stops the nodes in order.
func (nw *Network) start(p *Process, bootstrap []string) error {
	args := []string{"run", "--home", p.Home, "--testnet"}
	if nw.opts.Args != nil {
		args = append(args, nw.opts.Args(p.Index)...)
	}
	for _, b := range bootstrap {
		args = append(args, "--bootstrap", b)
	}
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("testnet: node %d: log: %w", p.Index, err)
	}
	defer logf.Close() // the child holds its own descriptor
	// A node's API file from a run that was killed would point at a dead
	// address; the node rewrites it once its API listens.
	_ = os.Remove(filepath.Join(p.Home, node.APIFile))
	cmd := exec.Command(nw.opts.Binary, args...)
	if nw.opts.Wrap != nil {
		if w := nw.opts.Wrap(p.Index); len(w) > 0 {
			cmd = exec.Command(w[0], append(append(w[1:], nw.opts.Binary), args...)...)
		}
	}
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = cleanEnv(os.Environ())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("testnet: node %d: start %s: %w", p.Index, nw.opts.Binary, err)
	}
	p.cmd = cmd
	p.done = make(chan struct{})
	go func() {
		p.exitErr = cmd.Wait()
		close(p.done)
	}()
	nw.log.Debug("node started", "node", p.Index, "pid", cmd.Process.Pid)
	return nil
}

// cleanEnv drops the NEURO_* variables that set config keys, so that the
// launcher's environment does not override the testnet's config files;
// the others (NEURO_BACKENDS, where GPU backends are) pass.
func cleanEnv(env []string) []string {
	keys := map[string]bool{}
	for _, k := range node.ConfigKeys() {
		keys[node.EnvVar(k)] = true
	}
	out := env[:0:0]
	for _, kv := range env {
		if name, _, _ := strings.Cut(kv, "="); !keys[name] {
			out = append(out, kv)
		}
	}
	return out
}

// waitAPI waits until the node's control API answers.
func (nw *Network) waitAPI(ctx context.Context, p *Process) error {
	err := waitFor(ctx, 50*time.Millisecond, func() error {
		select {
		case <-p.done:
			return backoffStop{fmt.Errorf("exited: %v", p.exitErr)}
		default:
		}
		addr, err := node.ReadAPIAddr(p.Home)
		if err != nil {
			return err
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		st, err := node.FetchStatus(rctx, addr)
		if err != nil {
			return err
		}
		p.APIAddr, p.Status = addr, st
		return nil
	})
	if err != nil {
		return fmt.Errorf("testnet: node %d did not come up: %w\n%s", p.Index, err, p.LogTail(20))
	}
	return nil
}

// backoffStop makes waitFor give up at once.
type backoffStop struct{ error }

// Refresh fetches every node's status.
func (nw *Network) Refresh(ctx context.Context) error {
	var errs []error
	for _, p := range nw.procs {
		if p.killed {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := node.FetchStatus(rctx, p.APIAddr)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("node %d: %w", p.Index, err))
			continue
		}
		p.Status = st
	}
	return errors.Join(errs...)
}

// WaitHealthy polls the nodes until Health passes or the launch timeout
// (counted from now) runs out. Took is updated to the time from the first
// start until healthy.
func (nw *Network) WaitHealthy(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, nw.opts.Timeout)
	defer cancel()
	start := time.Now()
	err := waitFor(ctx, 100*time.Millisecond, sayingWhy(nw.log, func() error {
		for _, p := range nw.procs {
			select {
			case <-p.done:
				return backoffStop{fmt.Errorf("node %d exited: %v", p.Index, p.exitErr)}
			default:
			}
		}
		if err := nw.Refresh(ctx); err != nil {
			return err
		}
		return Health(nw.Statuses())
	}))
	nw.Took += time.Since(start)
	return err
}

// Processes returns the nodes, bootstrap first.
func (nw *Network) Processes() []*Process { return nw.procs }

// Statuses returns the last status fetched from each node.
func (nw *Network) Statuses() []node.Status {
	out := make([]node.Status, len(nw.procs))
	for i, p := range nw.procs {
		out[i] = p.Status
	}
	return out
}

// Pause freezes every running node (SIGSTOP) until resume continues them
// (SIGCONT): a measurement on this machine then has its cores to itself,
// as one with no testnet up would, while the network stays as it was (a
// pause of seconds is far within the nodes' peer expiry).
func (nw *Network) Pause() (resume func()) {
	var paused []*Process
	for _, p := range nw.procs {
		// not started, or exited (os.ErrProcessDone): nothing to pause
		if p.Signal(syscall.SIGSTOP) == nil {
			paused = append(paused, p)
		}
	}
	return func() {
		for _, p := range paused {
			_ = p.Signal(syscall.SIGCONT)
		}
	}
}

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error {
	if p.cmd == nil {
		return errors.New("not started")
	}
	if sig == syscall.SIGKILL {
		p.killed = true
	}
	return p.cmd.Process.Signal(sig)
}

// Kill sends SIGKILL to the process (a crash, for fault tests) and waits
// for it to die.
func (p *Process) Kill() error {
	if p.cmd == nil {
		return errors.New("not started")
	}
	p.killed = true
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	<-p.done
	return nil
}

// ExitReport says how one process ended.
type ExitReport struct {
	Index int
	PID   int
	// Clean is true when the node exited with status 0 after SIGTERM.
	Clean bool
	// Killed is true when it ignored SIGTERM and was killed.
	Killed bool
	// Crashed is true when Kill ended it before the stop.
	Crashed bool
	Err     error
	// LogTail is the end of the log of a node that did not stop cleanly
	// and was not killed on purpose (where a crash says why: a C abort's
	// message, a panic).
	LogTail string
}

// Stop sends SIGTERM to every node, waits up to 15 s for them to shut down
// cleanly, then kills the rest. It returns how each process ended.
func (nw *Network) Stop() []ExitReport {
	var reports []ExitReport
	for _, p := range nw.procs {
		if p.cmd != nil {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	deadline := time.After(15 * time.Second)
	for _, p := range nw.procs {
		if p.cmd == nil {
			continue
		}
		r := ExitReport{Index: p.Index, PID: p.cmd.Process.Pid, Crashed: p.killed}
		select {
		case <-p.done:
		case <-deadline:
			_ = p.cmd.Process.Kill()
			<-p.done
			r.Killed = true
		}
		r.Err = p.exitErr
		r.Clean = !r.Killed && p.exitErr == nil
		if !r.Clean && !r.Crashed {
			r.LogTail = p.LogTail(20)
		}
		reports = append(reports, r)
	}
	return reports
}

// LogTail returns the last n lines of the process's log.
func (p *Process) LogTail(n int) string {
	f, err := os.Open(p.LogPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	const maxTail = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > maxTail {
		_, _ = f.Seek(st.Size()-maxTail, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, maxTail))
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "--- last lines of %s ---\n", p.LogPath)
	for _, l := range lines {
		sb.Write(l)
		sb.WriteByte('\n')
	}
	return sb.String()
}

// PID is the process ID, or 0 before start.
func (p *Process) PID() int {
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}
