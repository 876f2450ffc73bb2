package ledger

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/neuro-p2p/neuro/internal/atomicfile"
	"github.com/neuro-p2p/neuro/neuropb"
)

// genesisFile is the JSON form of a ChainGenesis.
type genesisFile struct {
	ChainID    string          `json:"chain_id"`
	Time       time.Time       `json:"genesis_time"`
	Validators []validatorFile `json:"validators"`
	Ledger     json.RawMessage `json:"ledger"`
}

type validatorFile struct {
	Peer  string `json:"peer"`
	Power int64  `json:"power"`
}

// WriteGenesis writes g to path as JSON.
func WriteGenesis(path string, g ChainGenesis) error {
	led, err := protojson.Marshal(g.Ledger)
	if err != nil {
		return fmt.Errorf("genesis: %w", err)
	}
	f := genesisFile{ChainID: g.ChainID, Time: g.Time, Ledger: led}
	for _, v := range g.Validators {
		f.Validators = append(f.Validators, validatorFile{Peer: v.Peer.String(), Power: v.Power})
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("genesis: %w", err)
	}
	return atomicfile.Write(path, b, 0o644)
}

// ReadGenesis reads a genesis file written by WriteGenesis, checking it.
func ReadGenesis(path string) (ChainGenesis, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return ChainGenesis{}, fmt.Errorf("genesis: %w", err)
	}
	var f genesisFile
	if err := json.Unmarshal(b, &f); err != nil {
		return ChainGenesis{}, fmt.Errorf("genesis %s: %w", path, err)
	}
	g := ChainGenesis{ChainID: f.ChainID, Time: f.Time, Ledger: &neuropb.LedgerGenesis{}}
	if err := protojson.Unmarshal(f.Ledger, g.Ledger); err != nil {
		return ChainGenesis{}, fmt.Errorf("genesis %s: ledger: %w", path, err)
	}
	if g.ChainID == "" || len(f.Validators) == 0 {
		return ChainGenesis{}, fmt.Errorf("genesis %s: a chain ID and at least one validator are needed", path)
	}
	for _, v := range f.Validators {
		p, err := peer.Decode(v.Peer)
		if err != nil || v.Power <= 0 {
			return ChainGenesis{}, fmt.Errorf("genesis %s: validator %q power %d: %v", path, v.Peer, v.Power, err)
		}
		g.Validators = append(g.Validators, Validator{Peer: p, Power: v.Power})
	}
	if _, err := g.genesisDoc(); err != nil {
		return ChainGenesis{}, err
	}
	if _, err := NewState(g.Ledger); err != nil {
		return ChainGenesis{}, err
	}
	return g, nil
}

// IsValidator reports whether p validates the chain.
func (g ChainGenesis) IsValidator(p peer.ID) bool {
	for _, v := range g.Validators {
		if v.Peer == p {
			return true
		}
	}
	return false
}
