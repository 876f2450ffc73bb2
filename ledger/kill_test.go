package ledger

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/neuropb"
)

// validatorEnv, when set, makes the test binary run one validator of the
// chain it describes (a validatorSpec as JSON) instead of the tests: the
// SIGKILL test runs real processes.
const validatorEnv = "NEURO_TEST_VALIDATOR"

type validatorSpec struct {
	Dir   string `json:"dir"`
	Seed  uint64 `json:"seed"`
	Index int    `json:"index"`
	Ports []int  `json:"ports"`
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(validatorEnv); spec != "" {
		if err := runValidator(spec); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// fatalTB lets the validator process use the tests' helpers: a failure
// ends the process.
type fatalTB struct{ testing.TB }

func (fatalTB) Helper()           {}
func (fatalTB) Fatal(args ...any) { fmt.Fprintln(os.Stderr, args...); os.Exit(1) }
func (fatalTB) Fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func killChain(seed uint64, n int) ([]*actor, ChainGenesis) {
	actors := newActors(fatalTB{}, n, rand.New(rand.NewPCG(seed, seed)))
	g := ChainGenesis{ChainID: "neuro-kill", Time: time.Unix(1_700_000_000, 0).UTC(), Ledger: genesisFor(actors)}
	for _, a := range actors {
		g.Validators = append(g.Validators, Validator{Peer: a.id, Power: 10})
	}
	return actors, g
}

// runValidator runs validator spec.Index until killed. It prints
// "block HEIGHT APPHASH NONCE" after every block (NONCE: its own
// account's) and sends a transfer whenever its last one has been applied.
func runValidator(specJSON string) error {
	var spec validatorSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		return err
	}
	actors, g := killChain(spec.Seed, len(spec.Ports))
	me := actors[spec.Index]
	var peers []string
	for j, a := range actors {
		if j != spec.Index {
			id, err := NodeID(a.id)
			if err != nil {
				return err
			}
			peers = append(peers, fmt.Sprintf("%s@127.0.0.1:%d", id, spec.Ports[j]))
		}
	}
	var out sync.Mutex
	c, err := StartChain(ChainConfig{Dir: spec.Dir, Key: me.key, Genesis: g, Listen: fmt.Sprintf("tcp://127.0.0.1:%d", spec.Ports[spec.Index]),
		Peers: peers, BlockInterval: 100 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		AfterBlock: func(s *State) {
			if err := s.CheckInvariant(); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			var nonce uint64
			if a := s.Accounts[me.id.String()]; a != nil {
				nonce = a.Nonce
			}
			out.Lock()
			fmt.Printf("block %d %x %d\n", s.Height, s.Hash(), nonce)
			out.Unlock()
		}})
	if err != nil {
		return err
	}
	next := actors[(spec.Index+1)%len(actors)].id
	for {
		time.Sleep(150 * time.Millisecond)
		if a := c.App.State().Accounts[me.id.String()]; a != nil && a.Nonce >= me.nonce {
			me.nonce = a.Nonce
			_ = c.Submit(me.tx(fatalTB{}, func(tx *neuropb.LedgerTx) {
				tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(next), Amount: 1}}
			}))
		}
	}
}

// validatorProc is one validator process of the SIGKILL test.
type validatorProc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// TestValidatorsSurviveSIGKILL runs four validators as processes and
// kills one with SIGKILL at a random moment, three times: each time the
// other three keep committing, and the killed one restarts on its own data
// and catches up; every height's app hash is the same on every validator
// that computed it, also across the restarts.
func TestValidatorsSurviveSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("four validator processes")
	}
	t.Parallel() // mostly waiting for blocks
	const n, rounds = 4, 3
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 17))
	seed := rng.Uint64()
	t.Logf("seed %d", seed)
	ports := make([]int, n)
	for i := range ports {
		ports[i] = freePort(t)
	}
	dir := t.TempDir()
	var mu sync.Mutex
	hashes := make([]map[int64]string, n) // by validator and height
	height := make([]int64, n)
	nonce := make([]uint64, n)
	for i := range hashes {
		hashes[i] = map[int64]string{}
	}
	procs := make([]*validatorProc, n)
	start := func(i int) {
		t.Helper()
		spec, _ := json.Marshal(validatorSpec{Dir: filepath.Join(dir, strconv.Itoa(i)), Seed: seed, Index: i, Ports: ports})
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), validatorEnv+"="+string(spec))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		p := &validatorProc{cmd: cmd, done: make(chan struct{})}
		procs[i] = p
		go func() {
			defer close(p.done)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				f := strings.Fields(sc.Text())
				if len(f) != 4 || f[0] != "block" {
					continue
				}
				h, _ := strconv.ParseInt(f[1], 10, 64)
				nc, _ := strconv.ParseUint(f[3], 10, 64)
				mu.Lock()
				if old, ok := hashes[i][h]; ok && old != f[2] {
					t.Errorf("validator %d recomputed height %d as %s, had %s", i, h, f[2], old)
				}
				hashes[i][h], height[i], nonce[i] = f[2], max(height[i], h), nc
				mu.Unlock()
			}
			if err := cmd.Wait(); err != nil && !killed(err) {
				t.Errorf("validator %d: %v: %s", i, err, stderr.String())
			}
		}()
	}
	kill := func(i int) {
		if procs[i] != nil {
			_ = procs[i].cmd.Process.Signal(syscall.SIGKILL)
			<-procs[i].done
			procs[i] = nil
		}
	}
	t.Cleanup(func() {
		for i := range procs {
			kill(i)
		}
	})
	for i := range n {
		start(i)
	}
	heightOf := func(i int) int64 {
		mu.Lock()
		defer mu.Unlock()
		return height[i]
	}
	// wait waits until every validator in who reaches h.
	wait := func(who []int, h int64, what string) {
		t.Helper()
		for tries := 0; ; tries++ {
			ok := true
			for _, i := range who {
				ok = ok && heightOf(i) >= h
			}
			if ok {
				return
			}
			if tries == 1200 {
				mu.Lock()
				defer mu.Unlock()
				t.Fatalf("%s: height %d not reached in 120 s (heights %v)", what, h, height)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	all := []int{0, 1, 2, 3}
	wait(all, 3, "start")
	for round := range rounds {
		victim := rng.IntN(n)
		time.Sleep(time.Duration(rng.IntN(800)) * time.Millisecond)
		kill(victim)
		var others []int
		var top int64
		for _, i := range all {
			if i != victim {
				others = append(others, i)
				top = max(top, heightOf(i))
			}
		}
		t.Logf("round %d: validator %d killed at height %d (others at %d)", round, victim, heightOf(victim), top)
		// Three of four hold more than 2/3 of the power: blocks go on.
		wait(others, top+3, "without the killed validator")
		start(victim)
		top = max(heightOf(others[0]), heightOf(others[1]), heightOf(others[2]))
		wait([]int{victim}, top, "the restarted validator catching up")
	}
	mu.Lock()
	defer mu.Unlock()
	compared := 0
	for h, want := range hashes[0] {
		for i := 1; i < n; i++ {
			if got, ok := hashes[i][h]; ok {
				compared++
				if got != want {
					t.Fatalf("height %d: validator %d app hash %s, validator 0 %s", h, i, got, want)
				}
			}
		}
	}
	for i := range n {
		if nonce[i] == 0 {
			t.Errorf("validator %d: none of its transfers applied", i)
		}
	}
	if compared < int(height[0]) {
		t.Fatalf("only %d app hashes compared over %d blocks", compared, height[0])
	}
	t.Logf("%d app hashes equal across validators; heights %v, nonces %v", compared, height, nonce)
}

func killed(err error) bool {
	var ee *exec.ExitError
	if ok := errors.As(err, &ee); ok {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true
		}
	}
	return false
}
