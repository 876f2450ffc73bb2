package ledger

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	cmtcfg "github.com/cometbft/cometbft/config"
	"github.com/cometbft/cometbft/crypto/ed25519"
	"github.com/cometbft/cometbft/crypto/tmhash"
	cmtlog "github.com/cometbft/cometbft/libs/log"
	cmtnode "github.com/cometbft/cometbft/node"
	cmtp2p "github.com/cometbft/cometbft/p2p"
	"github.com/cometbft/cometbft/privval"
	"github.com/cometbft/cometbft/proxy"
	cmttypes "github.com/cometbft/cometbft/types"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/neuro-p2p/neuro/neuropb"
)

// Validator is a genesis validator: a node's peer ID (its libp2p Ed25519
// key is also its CometBFT validator and node key) and voting power.
type Validator struct {
	Peer  peer.ID
	Power int64
}

// ChainGenesis is a chain's genesis: CometBFT's (chain ID, time,
// validators) and the ledger's.
type ChainGenesis struct {
	ChainID    string
	Time       time.Time
	Validators []Validator
	Ledger     *neuropb.LedgerGenesis
}

// ChainConfig starts one node of a chain.
type ChainConfig struct {
	// Dir holds CometBFT's data and the ledger's state (<home>/ledger).
	Dir string
	// Key is the node's libp2p Ed25519 key.
	Key     crypto.PrivKey
	Genesis ChainGenesis
	// Listen is CometBFT's own p2p address ("tcp://127.0.0.1:26656");
	// Peers are the other validators as "nodeid@host:port" (NodeID).
	Listen string
	Peers  []string
	// BlockInterval is the pause after a commit (CometBFT's
	// timeout_commit; default 200 ms).
	BlockInterval time.Duration
	Log           *slog.Logger
	// AfterBlock, if set, sees every finalized state (App.AfterBlock).
	AfterBlock func(*State)
}

// Chain is a running CometBFT node with the ledger as its application.
type Chain struct {
	App  *App
	node *cmtnode.Node
}

// cometKey converts a libp2p Ed25519 key to CometBFT's (both are the 64
// bytes seed || public key).
func cometKey(k crypto.PrivKey) (ed25519.PrivKey, error) {
	if k.Type() != crypto.Ed25519 {
		return nil, fmt.Errorf("ledger: a %s key cannot sign blocks (Ed25519 only)", k.Type())
	}
	raw, err := k.Raw()
	if err != nil || len(raw) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("ledger: Ed25519 key of %d bytes: %v", len(raw), err)
	}
	return ed25519.PrivKey(raw), nil
}

func cometPub(p peer.ID) (ed25519.PubKey, error) {
	pub, err := p.ExtractPublicKey()
	if err != nil {
		return nil, fmt.Errorf("validator %s: %w", p, err)
	}
	raw, err := pub.Raw()
	if err != nil || pub.Type() != crypto.Ed25519 || len(raw) != ed25519.PubKeySize {
		return nil, fmt.Errorf("validator %s: want an Ed25519 key", p)
	}
	return ed25519.PubKey(raw), nil
}

// NodeID is the CometBFT node ID of a peer (for ChainConfig.Peers).
func NodeID(p peer.ID) (string, error) {
	pub, err := cometPub(p)
	if err != nil {
		return "", err
	}
	return string(cmtp2p.PubKeyToID(pub)), nil
}

// genesisDoc builds CometBFT's genesis document.
func (g ChainGenesis) genesisDoc() (*cmttypes.GenesisDoc, error) {
	app, err := protojson.Marshal(g.Ledger)
	if err != nil {
		return nil, err
	}
	doc := &cmttypes.GenesisDoc{ChainID: g.ChainID, GenesisTime: g.Time, InitialHeight: 1, AppState: app,
		ConsensusParams: cmttypes.DefaultConsensusParams()}
	for _, v := range g.Validators {
		pub, err := cometPub(v.Peer)
		if err != nil {
			return nil, err
		}
		doc.Validators = append(doc.Validators, cmttypes.GenesisValidator{Address: pub.Address(), PubKey: pub, Power: v.Power, Name: v.Peer.String()})
	}
	if err := doc.ValidateAndComplete(); err != nil {
		return nil, fmt.Errorf("ledger genesis: %w", err)
	}
	return doc, nil
}

// StartChain starts the node: it opens the ledger in cfg.Dir and runs
// CometBFT consensus with it until Stop.
func StartChain(cfg ChainConfig) (*Chain, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.BlockInterval <= 0 {
		cfg.BlockInterval = 200 * time.Millisecond
	}
	key, err := cometKey(cfg.Key)
	if err != nil {
		return nil, err
	}
	doc, err := cfg.Genesis.genesisDoc()
	if err != nil {
		return nil, err
	}
	app, err := NewApp(filepath.Join(cfg.Dir, "app"), cfg.Genesis.Ledger)
	if err != nil {
		return nil, err
	}
	app.AfterBlock = cfg.AfterBlock
	c := cmtcfg.DefaultConfig()
	c.SetRoot(filepath.Join(cfg.Dir, "comet"))
	for _, d := range []string{"config", "data"} {
		if err := os.MkdirAll(filepath.Join(c.RootDir, d), 0o700); err != nil {
			return nil, fmt.Errorf("ledger: %w", err)
		}
	}
	c.Moniker = "neurod"
	c.P2P.ListenAddress = cfg.Listen
	c.P2P.PersistentPeers = strings.Join(cfg.Peers, ",")
	c.P2P.AddrBookStrict = false // loopback testnets
	c.P2P.AllowDuplicateIP = true
	c.P2P.PexReactor = false
	c.RPC.ListenAddress = "" // neurod answers queries over libp2p, not CometBFT's RPC
	c.Consensus.TimeoutCommit = cfg.BlockInterval
	c.Consensus.CreateEmptyBlocks = true
	c.Instrumentation.Prometheus = false
	c.TxIndex.Indexer = "null"
	c.DBBackend = "goleveldb"
	c.StateSync.Enable = false
	if err := c.ValidateBasic(); err != nil {
		return nil, fmt.Errorf("ledger: comet config: %w", err)
	}
	var pv *privval.FilePV
	if _, err := os.Stat(c.PrivValidatorStateFile()); err == nil {
		// Keep the last signed height: never sign twice after a crash.
		pv = privval.LoadFilePV(c.PrivValidatorKeyFile(), c.PrivValidatorStateFile())
	} else {
		pv = privval.NewFilePV(key, c.PrivValidatorKeyFile(), c.PrivValidatorStateFile())
		pv.Save()
	}
	nodeKey := &cmtp2p.NodeKey{PrivKey: key}
	sum := tmhash.Sum([]byte(doc.ChainID))
	genesis := func() (cmtnode.ChecksummedGenesisDoc, error) {
		return cmtnode.ChecksummedGenesisDoc{GenesisDoc: doc, Sha256Checksum: sum}, nil
	}
	n, err := cmtnode.NewNode(context.Background(), c, pv, nodeKey, proxy.NewLocalClientCreator(app), genesis,
		closedReadsEmpty, cmtnode.DefaultMetricsProvider(c.Instrumentation), slogAdapter{cfg.Log.With("component", "cometbft")})
	if err != nil {
		return nil, fmt.Errorf("ledger: comet node: %w", err)
	}
	if err := n.Start(); err != nil {
		return nil, fmt.Errorf("ledger: start comet: %w", err)
	}
	return &Chain{App: app, node: n}, nil
}

// Submit checks a signed transaction and puts it in the mempool, from
// which CometBFT gossips it to the other validators.
func (c *Chain) Submit(tx []byte) error {
	rr, err := c.node.Mempool().CheckTx(cmttypes.Tx(tx), "")
	if err != nil {
		return fmt.Errorf("ledger: submit: %w", err)
	}
	rr.Wait()
	if r := rr.Response.GetCheckTx(); r != nil && r.Code != 0 {
		return &TxError{Code: r.Code, Msg: r.Log}
	}
	return nil
}

// proven returns the newest committed state that a stored header commits
// to (its app hash is in the header of the next block), with that header
// and the commit that signs it, encoded.
func (c *Chain) proven() (*State, []byte, []byte, error) {
	state, prev := c.App.committed()
	for _, st := range []*State{state, prev} {
		if st == nil {
			continue
		}
		bs := c.node.BlockStore()
		meta, commit := bs.LoadBlockMeta(st.Height+1), bs.LoadSeenCommit(st.Height+1)
		if meta == nil || commit == nil {
			continue
		}
		hp := meta.Header.ToProto()
		hdr, err := hp.Marshal()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("ledger: header: %w", err)
		}
		cb, err := commit.ToProto().Marshal()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("ledger: commit: %w", err)
		}
		return st, hdr, cb, nil
	}
	return nil, nil, nil, errors.New("ledger: no signed header yet for the committed state")
}

// Height is the last committed height.
func (c *Chain) Height() int64 { return c.node.BlockStore().Height() }

// Stop stops consensus and closes the stores.
func (c *Chain) Stop() error {
	if err := c.node.Stop(); err != nil {
		return fmt.Errorf("ledger: stop comet: %w", err)
	}
	c.node.Wait()
	return nil
}

// slogAdapter sends CometBFT's logs to slog, its info demoted to debug
// (it logs every block).
type slogAdapter struct{ l *slog.Logger }

func (a slogAdapter) Debug(msg string, kv ...any) { a.l.Debug(msg, kv...) }
func (a slogAdapter) Info(msg string, kv ...any)  { a.l.Debug(msg, kv...) }
func (a slogAdapter) Error(msg string, kv ...any) { a.l.Warn(msg, kv...) }
func (a slogAdapter) With(kv ...any) cmtlog.Logger {
	return slogAdapter{a.l.With(kv...)}
}
