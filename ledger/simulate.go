package ledger

import (
	"bytes"
	"fmt"
	"math/rand/v2"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/neuropb"
)

// EpochRow is the ledger at the end of one simulated epoch.
type EpochRow struct {
	Epoch                        int
	Supply, Treasury, Burned     uint64
	Emitted, Fees, ExpertsEarned uint64
}

// SimulateOptions describe a constant demand: clients settling
// InferencesPerBlock inferences of TokensPerInference tokens, each token
// costing FlopsPerToken of expert work, spread over Experts staked expert
// nodes.
type SimulateOptions struct {
	Epochs, Experts, InferencesPerBlock, TokensPerInference int
	FlopsPerToken                                           uint64
	Params                                                  *neuropb.LedgerParams
	Seed                                                    uint64
}

// Simulate runs the real state machine (signed transactions, EndBlock)
// under a constant demand and returns the supply, treasury, burn and
// emissions at the end of every epoch. It checks the supply invariant
// after every block.
func Simulate(o SimulateOptions) ([]EpochRow, error) {
	if o.Params == nil {
		o.Params = DefaultParams()
	}
	rng := rand.New(rand.NewPCG(o.Seed, 1))
	newKey := func() (crypto.PrivKey, peer.ID) {
		seed := make([]byte, 32)
		for i := range seed {
			seed[i] = byte(rng.Uint32())
		}
		k, _, _ := crypto.GenerateEd25519Key(bytes.NewReader(seed))
		id, _ := peer.IDFromPrivateKey(k)
		return k, id
	}
	mh, _ := multihash.Sum([]byte("simulated model"), multihash.SHA2_256, -1)
	model := cid.NewCidV1(cid.Raw, mh)
	g := &neuropb.LedgerGenesis{Params: o.Params, Models: [][]byte{model.Bytes()}}
	clientKey, client := newKey()
	gatingKey, gating := newKey()
	g.Accounts = append(g.Accounts, &neuropb.LedgerGenesis_Account{Peer: []byte(client), Balance: 1_000_000 * BaseUnits},
		&neuropb.LedgerGenesis_Account{Peer: []byte(gating), Balance: 0, Stake: o.Params.GetMinStake()})
	experts := make([]crypto.PrivKey, o.Experts)
	for i := range experts {
		var id peer.ID
		experts[i], id = newKey()
		g.Accounts = append(g.Accounts, &neuropb.LedgerGenesis_Account{Peer: []byte(id), Stake: o.Params.GetMinStake()})
	}
	s, err := NewState(g)
	if err != nil {
		return nil, err
	}
	var clientNonce, gatingNonce uint64
	send := func(key crypto.PrivKey, nonce *uint64, body func(*neuropb.LedgerTx)) error {
		*nonce++
		tx := &neuropb.LedgerTx{Nonce: *nonce}
		body(tx)
		if err := SignTx(key, tx); err != nil {
			return err
		}
		return s.Apply(tx)
	}
	var rows []EpochRow
	var fees, earned uint64
	blocks := o.Epochs * int(o.Params.GetEpochBlocks())
	for h := 1; h <= blocks; h++ {
		s.Height = int64(h)
		for range o.InferencesPerBlock {
			flops := uint64(o.TokensPerInference) * o.FlopsPerToken
			deposit := mulDiv(flops, o.Params.GetPricePerMflop(), 1_000_000) + 1
			id := EscrowID(client, clientNonce+1)
			if err := send(clientKey, &clientNonce, func(tx *neuropb.LedgerTx) {
				tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: model.Bytes(), Gating: []byte(gating), Amount: deposit}}
			}); err != nil {
				return nil, fmt.Errorf("block %d: escrow: %w", h, err)
			}
			var receipts []*neuropb.UsageReceipt
			for range 2 {
				r := &neuropb.UsageReceipt{Escrow: id, Tokens: uint64(o.TokensPerInference), Flops: flops / 2}
				if err := SignReceipt(experts[rng.IntN(len(experts))], r); err != nil {
					return nil, err
				}
				receipts = append(receipts, r)
			}
			before := s.Escrows[id].Remaining
			if err := send(gatingKey, &gatingNonce, func(tx *neuropb.LedgerTx) {
				tx.Body = &neuropb.LedgerTx_Settle{Settle: &neuropb.Settle{Escrow: id, Receipts: receipts}}
			}); err != nil {
				return nil, fmt.Errorf("block %d: settle: %w", h, err)
			}
			fee := before - s.Escrows[id].Remaining
			fees += fee
			earned += fee - mulDiv(fee, uint64(o.Params.GetTreasuryBps()), 10000) - mulDiv(fee, uint64(o.Params.GetGatingBps()), 10000)
		}
		s.EndBlock(int64(h))
		if err := s.CheckInvariant(); err != nil {
			return nil, err
		}
		if uint64(h)%o.Params.GetEpochBlocks() == 0 {
			rows = append(rows, EpochRow{Epoch: len(rows) + 1, Supply: s.Supply(), Treasury: s.Treasury, Burned: s.Burned,
				Emitted: s.Emitted, Fees: fees, ExpertsEarned: earned})
		}
	}
	return rows, nil
}
