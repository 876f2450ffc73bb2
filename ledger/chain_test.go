package ledger

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/neuropb"
)

func freePort(t *testing.T) int {
	t.Helper()
	p, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Four validators on loopback commit blocks together: a transfer
// submitted to one is applied by all with the same app hash; with one
// validator stopped the others go on, and it catches up when it returns.
func TestFourValidators(t *testing.T) {
	if testing.Short() {
		t.Skip("a real four-validator chain")
	}
	t.Parallel() // mostly waiting for blocks
	rng := rand.New(rand.NewPCG(9, 9))
	actors := newActors(t, 4, rng)
	g := ChainGenesis{ChainID: "neuro-test", Time: time.Unix(1_700_000_000, 0).UTC(), Ledger: genesisFor(actors)}
	ports := make([]int, 4)
	for i, a := range actors {
		g.Validators = append(g.Validators, Validator{Peer: a.id, Power: 10})
		ports[i] = freePort(t)
	}
	dir := t.TempDir()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	// hashes[i][h] is validator i's app hash after block h.
	var mu sync.Mutex
	hashes := make([]map[int64][]byte, 4)
	cfgOf := func(i int) ChainConfig {
		var peers []string
		for j, a := range actors {
			if j != i {
				id, err := NodeID(a.id)
				if err != nil {
					t.Fatal(err)
				}
				peers = append(peers, fmt.Sprintf("%s@127.0.0.1:%d", id, ports[j]))
			}
		}
		mu.Lock()
		if hashes[i] == nil {
			hashes[i] = map[int64][]byte{}
		}
		mu.Unlock()
		return ChainConfig{Dir: filepath.Join(dir, fmt.Sprint(i)), Key: actors[i].key, Genesis: g,
			Listen: fmt.Sprintf("tcp://127.0.0.1:%d", ports[i]), Peers: peers, BlockInterval: 100 * time.Millisecond, Log: quiet,
			AfterBlock: func(s *State) {
				if err := s.CheckInvariant(); err != nil {
					t.Error(err)
				}
				mu.Lock()
				hashes[i][s.Height] = s.Hash()
				mu.Unlock()
			}}
	}
	chains := make([]*Chain, 4)
	for i := range chains {
		c, err := StartChain(cfgOf(i))
		if err != nil {
			t.Fatal(err)
		}
		chains[i] = c
		t.Cleanup(func() {
			if chains[i] != nil {
				chains[i].Stop()
			}
		})
	}
	waitHeight := func(cs []*Chain, h int64) {
		t.Helper()
		for i := 0; ; i++ {
			ok := true
			for _, c := range cs {
				ok = ok && c != nil && c.App.State().Height >= h
			}
			if ok {
				return
			}
			if i == 600 {
				t.Fatalf("height %d not reached in 60 s", h)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitHeight(chains, 2)
	send := func(c *Chain, amount uint64) {
		t.Helper()
		tx := actors[0].tx(t, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: amount}}
		})
		if err := c.Submit(tx); err != nil {
			t.Fatal(err)
		}
	}
	send(chains[2], BaseUnits)
	balance := func(c *Chain) uint64 { return c.App.State().Accounts[actors[1].id.String()].Balance }
	for i := 0; balance(chains[0]) != 10_001*BaseUnits; i++ {
		if i == 600 {
			t.Fatal("transfer not applied in 60 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Stop validator 3: three of four hold more than 2/3 of the power.
	if err := chains[3].Stop(); err != nil {
		t.Fatal(err)
	}
	chains[3] = nil
	h := chains[0].App.State().Height
	send(chains[1], 2*BaseUnits)
	waitHeight(chains[:3], h+3)
	// It comes back and catches up to the same app hash.
	c3, err := StartChain(cfgOf(3))
	if err != nil {
		t.Fatal(err)
	}
	chains[3] = c3
	target := chains[0].App.State().Height
	waitHeight(chains, target)
	for i, c := range chains {
		if balance(c) != 10_003*BaseUnits {
			t.Fatalf("validator %d: balance %d after catching up", i, balance(c))
		}
	}
	// Validator 3 replayed the blocks it missed: its hashes at every height
	// it computed equal validator 0's.
	mu.Lock()
	defer mu.Unlock()
	compared := 0
	for h, want := range hashes[0] {
		for i := 1; i < 4; i++ {
			if got, ok := hashes[i][h]; ok {
				compared++
				if !bytes.Equal(got, want) {
					t.Fatalf("height %d: validator %d app hash %x, validator 0 %x", h, i, got, want)
				}
			}
		}
	}
	if hashes[3][target] == nil || compared < 3*int(target)/2 {
		t.Fatalf("compared %d hashes; validator 3 has height %d: %v", compared, target, hashes[3][target] != nil)
	}
}
