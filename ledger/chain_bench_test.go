package ledger

import (
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/neuro-p2p/neuro/neuropb"
)

// BenchmarkChainThroughput submits 2,000 signed transfers from 20 accounts
// to the validators of a four-validator loopback chain (200 ms blocks) and
// reports transactions per second and the confirmation latency (submit to
// the validator's commit of the block) p50 and p99.
// go test ./ledger -run '^$' -bench ChainThroughput -benchtime 1x
func BenchmarkChainThroughput(b *testing.B) {
	rng := rand.New(rand.NewPCG(4, 4))
	vals := newActors(b, 4, rng)
	senders := newActors(b, 20, rng)
	g := ChainGenesis{ChainID: "neuro-bench", Time: time.Unix(1_700_000_000, 0).UTC(), Ledger: genesisFor(append(slices.Clone(vals), senders...))}
	ports := make([]int, 4)
	for i, v := range vals {
		g.Validators = append(g.Validators, Validator{Peer: v.id, Power: 10})
		l, _ := FreePort()
		ports[i] = l
	}
	var mu sync.Mutex
	applied := map[string]uint64{} // sender -> nonce applied on validator 0
	var commits []time.Time
	waiting := map[string]map[uint64]time.Time{}
	var lat []float64
	dir := b.TempDir()
	var chains []*Chain
	for i, v := range vals {
		var peers []string
		for j, w := range vals {
			if j != i {
				id, _ := NodeID(w.id)
				peers = append(peers, fmt.Sprintf("%s@127.0.0.1:%d", id, ports[j]))
			}
		}
		cfg := ChainConfig{Dir: filepath.Join(dir, fmt.Sprint(i)), Key: v.key, Genesis: g, Listen: fmt.Sprintf("tcp://127.0.0.1:%d", ports[i]),
			Peers: peers, BlockInterval: 200 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
		if i == 0 {
			cfg.AfterBlock = func(s *State) {
				now := time.Now()
				mu.Lock()
				defer mu.Unlock()
				commits = append(commits, now)
				for _, a := range senders {
					acc := s.Accounts[a.id.String()]
					if acc == nil {
						continue
					}
					for n := applied[a.id.String()] + 1; n <= acc.Nonce; n++ {
						if at, ok := waiting[a.id.String()][n]; ok {
							lat = append(lat, float64(now.Sub(at).Microseconds())/1000)
						}
					}
					applied[a.id.String()] = acc.Nonce
				}
			}
		}
		c, err := StartChain(cfg)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Stop()
		chains = append(chains, c)
	}
	for chains[0].App.State().Height < 2 {
		time.Sleep(50 * time.Millisecond)
	}
	const perSender = 100
	b.ResetTimer()
	start := time.Now()
	for n := range perSender {
		for i, a := range senders {
			raw := a.tx(b, func(tx *neuropb.LedgerTx) {
				tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(vals[0].id), Amount: 1}}
			})
			mu.Lock()
			if waiting[a.id.String()] == nil {
				waiting[a.id.String()] = map[uint64]time.Time{}
			}
			waiting[a.id.String()][uint64(n+1)] = time.Now()
			mu.Unlock()
			if err := chains[i%4].Submit(raw); err != nil {
				b.Fatal(err)
			}
		}
	}
	for i := 0; ; i++ {
		mu.Lock()
		done := len(lat) == perSender*len(senders)
		mu.Unlock()
		if done {
			break
		}
		if i == 1200 {
			b.Fatalf("only %d of %d transactions applied in 2 minutes", len(lat), perSender*len(senders))
		}
		time.Sleep(100 * time.Millisecond)
	}
	took := time.Since(start)
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lat)
	b.ReportMetric(float64(len(lat))/took.Seconds(), "tx/s")
	b.ReportMetric(lat[len(lat)/2], "p50-ms")
	b.ReportMetric(lat[len(lat)*99/100], "p99-ms")
}

// BenchmarkSettleCost is what one settled inference costs the chain: the
// bytes of a settlement of 128 receipts (one per expert call of a short
// generation) and the time to check and apply it.
func BenchmarkSettleCost(b *testing.B) {
	const receipts = 128
	rng := rand.New(rand.NewPCG(5, 5))
	actors := newActors(b, 4, rng)
	payer, gating := actors[0], actors[1]
	var size int
	var took time.Duration
	for range b.N {
		app, err := NewApp("", genesisFor(actors))
		if err != nil {
			b.Fatal(err)
		}
		payer.nonce, gating.nonce = 0, 0
		open := payer.tx(b, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: testModel().Bytes(), Gating: []byte(gating.id), Amount: 100 * BaseUnits}}
		})
		eid := EscrowID(payer.id, payer.nonce)
		block(b, []*App{app}, 1, [][]byte{open})
		var rs []*neuropb.UsageReceipt
		for i := range receipts {
			ex := actors[2+i%2]
			in, out := []float32{rng.Float32()}, []float32{rng.Float32()}
			r := &neuropb.UsageReceipt{Escrow: eid, Layer: uint32(i % 24), ExpertIndex: uint32(i % 8), Tokens: 1, Flops: 6 * 4096 * 14336,
				InputDigest: neuropb.FloatsDigest(in), OutputDigest: neuropb.FloatsDigest(out)}
			if err := SignReceipt(ex.key, r); err != nil {
				b.Fatal(err)
			}
			rs = append(rs, r)
		}
		settle := gating.tx(b, func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: eid, Receipts: rs}}
		})
		size = len(settle)
		start := time.Now()
		if res := block(b, []*App{app}, 2, [][]byte{settle}); res[0].Code != 0 {
			b.Fatal(res[0].Log)
		}
		took += time.Since(start)
	}
	b.ReportMetric(float64(size), "bytes/settlement")
	b.ReportMetric(float64(size)/receipts, "bytes/receipt")
	b.ReportMetric(float64(took.Microseconds())/float64(b.N), "µs/settlement")
}
