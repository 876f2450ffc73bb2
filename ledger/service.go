package ledger

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/p2p/wire"
)

// ServiceConfig configures a node's part in the ledger.
type ServiceConfig struct {
	// Dir holds the chain's data (validators only).
	Dir     string
	Genesis ChainGenesis
	// Listen and Peers are CometBFT's p2p address and the other
	// validators ("nodeid@host:port"), for validators.
	Listen        string
	Peers         []string
	BlockInterval time.Duration
}

// Service is a node's part in the ledger. Every node publishes its signed
// transactions on the ledger topic and asks validators for balances over
// /neuro/ledger/query/1.0.0; a validator (named in genesis) also runs the
// chain, puts the transactions it hears into its mempool and answers
// queries.
type Service struct {
	h     Network
	key   crypto.PrivKey
	cfg   ServiceConfig
	log   *slog.Logger
	chain *Chain
	topic *p2p.Topic[*neuropb.LedgerTx]

	ctx       context.Context
	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error

	sendMu    sync.Mutex
	lastNonce uint64    // the last nonce this node used
	lastSent  time.Time // and when
}

// nonceGrace is how long a sent transaction may take to reach a block
// before its nonce is taken to be free again (a validator refused it).
const nonceGrace = 5 * time.Second

// Network is what the ledger service uses of the p2p stack (*p2p.Host).
type Network interface {
	LibP2P() host.Host
	ID() peer.ID
	PubSub() *pubsub.PubSub
	Rejections() *p2p.Rejections
	DHT() *dht.IpfsDHT
}

var _ Network = (*p2p.Host)(nil)

// NewService joins the ledger topic. It starts nothing: Start runs the
// chain on a validator.
func NewService(h Network, key crypto.PrivKey, cfg ServiceConfig, log *slog.Logger) (_ *Service, err error) {
	if log == nil {
		log = slog.Default()
	}
	if key == nil {
		return nil, errors.New("ledger: no key")
	}
	s := &Service{h: h, key: key, cfg: cfg, log: log.With("component", "ledger"), done: make(chan struct{})}
	s.topic, err = p2p.JoinTopic(h.PubSub(), neuropb.TopicLedger, neuropb.MaxLedgerTxSize,
		func() *neuropb.LedgerTx { return new(neuropb.LedgerTx) },
		func(_ context.Context, author peer.ID, tx *neuropb.LedgerTx) error { return verifyTx(tx) }, h.Rejections())
	if err != nil {
		return nil, fmt.Errorf("ledger topic: %w", err)
	}
	return s, nil
}

// Height is the chain's last committed height on a validator (0 elsewhere).
func (s *Service) Height() int64 {
	if s.chain == nil {
		return 0
	}
	return s.chain.Height()
}

// MempoolSize is how many transactions wait in a validator's mempool (0
// elsewhere).
func (s *Service) MempoolSize() int {
	if s.chain == nil {
		return 0
	}
	return s.chain.node.Mempool().Size()
}

// Validator reports whether this node runs the chain (genesis names it a
// validator).
func (s *Service) Validator() bool { return s.cfg.Genesis.IsValidator(s.h.ID()) }

// Start runs the chain on a validator, answers ledger queries and relays
// the transactions heard on the topic into the mempool. Its goroutines
// run until Close; ctx is not kept.
func (s *Service) Start(context.Context) (err error) {
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if !s.Validator() {
		close(s.done)
		return nil
	}
	if s.chain, err = StartChain(ChainConfig{Dir: s.cfg.Dir, Key: s.key, Genesis: s.cfg.Genesis, Listen: s.cfg.Listen,
		Peers: s.cfg.Peers, BlockInterval: s.cfg.BlockInterval, Log: s.log}); err != nil {
		close(s.done)
		return err
	}
	s.h.LibP2P().SetStreamHandler(neuropb.LedgerQueryProtocol, s.serveQuery)
	sub, err := s.topic.Subscribe()
	if err != nil {
		close(s.done)
		return fmt.Errorf("subscribe to the ledger topic: %w", err)
	}
	go func() {
		defer close(s.done)
		defer sub.Cancel()
		held := newReorder(nonceGrace, 1024)
		for {
			m, err := sub.Next(s.ctx)
			if err != nil {
				return
			}
			relay(held, s.chain.Submit, m.Msg, s.log.With("from", m.Author))
		}
	}()
	return nil
}

// relay puts a transaction from the topic into the mempool. One refused
// for its nonce may have come ahead of its sender's previous one: it is
// held and tried again after the sender's next accepted transaction.
func relay(held *reorder, submit func([]byte) error, tx *neuropb.LedgerTx, log *slog.Logger) {
	queue := []*neuropb.LedgerTx{tx}
	for len(queue) > 0 {
		tx, queue = queue[0], queue[1:]
		raw, err := EncodeTx(tx)
		if err != nil {
			continue
		}
		err = submit(raw)
		var te *TxError
		switch {
		case err == nil:
			queue = append(queue, held.next(tx.GetSender(), time.Now())...)
		case errors.As(err, &te) && te.Code == CodeBadNonce && held.hold(tx, time.Now()):
			log.Debug("transaction from the topic held for its turn", "nonce", tx.GetNonce())
		default:
			log.Debug("transaction from the topic refused", "err", err)
		}
	}
}

// Close stops relaying and the chain. It returns
// once its goroutines have ended and is safe to call more than once.
func (s *Service) Close() error {
	s.closeOnce.Do(func() {
		if s.cancel != nil {
			s.cancel()
			<-s.done
		}
		var errs []error
		if s.chain != nil {
			s.h.LibP2P().RemoveStreamHandler(neuropb.LedgerQueryProtocol)
			errs = append(errs, s.chain.Stop())
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// precheck refuses a transaction the sender's funds cannot pay for, with
// the chain's own error.
func precheck(st *neuropb.LedgerStatus, tx *neuropb.LedgerTx) error {
	acc := &Account{Balance: st.GetBalance(), Staked: st.GetStaked(), Nonce: st.GetNonce()}
	probe := emptyState()
	probe.params = DefaultParams()
	switch b := tx.GetBody().(type) {
	case *neuropb.LedgerTx_Transfer, *neuropb.LedgerTx_Stake, *neuropb.LedgerTx_Unstake:
		return probe.apply(peer.ID(tx.GetSender()).String(), acc, tx)
	case *neuropb.LedgerTx_Propose, *neuropb.LedgerTx_Vote:
		if acc.Staked == 0 {
			return txErr(CodeNotAllowed, "only stakers propose and vote")
		}
	case *neuropb.LedgerTx_OpenEscrow:
		if b.OpenEscrow.GetAmount() > acc.Balance {
			return txErr(CodeInsufficient, "escrow of %d with a balance of %d", b.OpenEscrow.GetAmount(), acc.Balance)
		}
	}
	return nil
}

func verifyTx(tx *neuropb.LedgerTx) error {
	raw, err := proto.Marshal(tx)
	if err != nil {
		return err
	}
	_, err = DecodeTx(raw)
	return err
}

// Send signs a transaction with this node's key and its next nonce and
// submits it: into the mempool on a validator, on the ledger topic
// elsewhere.
func (s *Service) Send(ctx context.Context, body func(*neuropb.LedgerTx)) (*neuropb.LedgerTx, error) {
	// Transactions sent before the last one's block: count nonces here.
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	st, err := s.Status(ctx, s.h.ID())
	if err != nil {
		return nil, err
	}
	next := st.GetNonce()
	if s.lastNonce > next && time.Since(s.lastSent) < nonceGrace {
		next = s.lastNonce // still in flight
	}
	tx := &neuropb.LedgerTx{Nonce: next + 1}
	body(tx)
	if err := SignTx(s.key, tx); err != nil {
		return nil, err
	}
	if s.chain != nil {
		raw, err := EncodeTx(tx)
		if err != nil {
			return nil, err
		}
		if err := s.chain.Submit(raw); err != nil {
			return nil, err
		}
		s.lastNonce, s.lastSent = tx.GetNonce(), time.Now()
		return tx, nil
	}
	if err := verifyTx(tx); err != nil {
		return nil, err
	}
	// A validator refuses a bad transaction silently when it comes over
	// the topic: refuse what the account's funds already rule out here.
	if err := precheck(st, tx); err != nil {
		return nil, err
	}
	if err := s.topic.Publish(ctx, tx); err != nil {
		return nil, fmt.Errorf("ledger: publish: %w", err)
	}
	s.lastNonce, s.lastSent = tx.GetNonce(), time.Now()
	return tx, nil
}

// Status is the chain's status and p's account, from the local chain or
// from a validator.
func (s *Service) Status(ctx context.Context, p peer.ID) (*neuropb.LedgerStatus, error) {
	if s.chain != nil {
		st := s.chain.App.State()
		out := statusOf(st, st.Held(), s.cfg.Genesis.ChainID, p)
		out.AppHash = st.Hash()
		return out, nil
	}
	var errs []error
	for _, v := range s.cfg.Genesis.Validators {
		st, err := s.query(ctx, v.Peer, p)
		if err == nil {
			return st, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("ledger: no validator answered: %w", errors.Join(errs...))
}

// status is this validator's answer for p: the status of the newest
// state that a stored, signed header commits to, with its proof.
func (s *Service) status(p peer.ID) *neuropb.LedgerStatus {
	st, hdr, commit, err := s.chain.proven()
	if err != nil {
		return &neuropb.LedgerStatus{Error: err.Error()}
	}
	out := statusOf(st, st.Held(), s.cfg.Genesis.ChainID, p)
	out.AppHash = st.Hash()
	out.Proof = st.prove(p)
	out.Proof.Header, out.Proof.Commit = hdr, commit
	return out
}

// statusOf is the status of p's account in st, whose accounts hold
// held in all (st may hold only some accounts).
func statusOf(st *State, held uint64, chainID string, p peer.ID) *neuropb.LedgerStatus {
	out := &neuropb.LedgerStatus{Height: st.Height, Treasury: st.Treasury, Burned: st.Burned,
		Emitted: st.Emitted, Supply: st.Supply(), Held: held, ChainId: chainID}
	for _, id := range sortedKeys(st.Proposals) {
		pr := st.Proposals[id]
		lp := &neuropb.LedgerProposal{Id: id, Ends: pr.Ends, Done: pr.Done, Passed: pr.Passed}
		if who, err := peer.Decode(pr.Proposer); err == nil {
			lp.Proposer = []byte(who)
		}
		if c, err := cid.Decode(pr.AddModel); err == nil {
			lp.AddModel = c.Bytes()
		}
		if len(pr.Params) > 0 {
			lp.Params = &neuropb.LedgerParams{}
			_ = proto.Unmarshal(pr.Params, lp.Params)
		}
		for _, v := range sortedKeys(pr.Votes) {
			if a := st.Accounts[v]; a != nil {
				if pr.Votes[v] {
					lp.YesStake += a.Staked
				} else {
					lp.NoStake += a.Staked
				}
			}
		}
		out.Proposals = append(out.Proposals, lp)
	}
	for _, id := range sortedKeys(st.Escrows) {
		if e := st.Escrows[id]; e.Payer == p.String() {
			out.Escrowed += e.Remaining
		}
	}
	if a := st.Accounts[p.String()]; a != nil {
		out.Balance, out.Staked, out.Nonce = a.Balance, a.Staked, a.Nonce
		for _, u := range a.Unbonding {
			out.Unbonding += u.Amount
		}
		for _, sp := range sortedKeys(a.Allowances) {
			if id, err := peer.Decode(sp); err == nil {
				out.Allowances = append(out.Allowances, &neuropb.Allow{Spender: []byte(id), Amount: a.Allowances[sp]})
			}
		}
	}
	return out
}

func (s *Service) query(ctx context.Context, validator, p peer.ID) (*neuropb.LedgerStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if s.h.LibP2P().Network().Connectedness(validator) != network.Connected {
		ai, err := s.h.DHT().FindPeer(ctx, validator)
		if err != nil {
			return nil, fmt.Errorf("validator %s: %w", validator, err)
		}
		if err := s.h.LibP2P().Connect(ctx, ai); err != nil {
			return nil, fmt.Errorf("validator %s: %w", validator, err)
		}
	}
	st, err := p2p.NewStream(ctx, s.h.LibP2P(), validator, neuropb.LedgerQueryProtocol)
	if err != nil {
		return nil, fmt.Errorf("validator %s: %w", validator, err)
	}
	defer st.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = st.SetDeadline(dl)
	}
	if err := wire.NewWriter(st, neuropb.MaxLedgerQuerySize).Write(&neuropb.LedgerQuery{Peer: []byte(p)}); err != nil {
		st.Reset()
		return nil, fmt.Errorf("validator %s: %w", validator, err)
	}
	_ = st.CloseWrite()
	out := &neuropb.LedgerStatus{}
	if err := wire.NewReader(st, neuropb.MaxLedgerQuerySize).Read(out); err != nil {
		return nil, fmt.Errorf("validator %s: %w", validator, err)
	}
	if out.GetError() != "" {
		return nil, fmt.Errorf("validator %s: %s", validator, out.GetError())
	}
	proven, err := VerifyStatus(s.cfg.Genesis, p, out)
	if err != nil {
		return nil, fmt.Errorf("validator %s: %w", validator, err)
	}
	proven.Proof.Validator = []byte(validator)
	return proven, nil
}

func (s *Service) serveQuery(st network.Stream) {
	defer st.Close()
	_ = st.SetDeadline(time.Now().Add(10 * time.Second))
	q := &neuropb.LedgerQuery{}
	w := wire.NewWriter(st, neuropb.MaxLedgerQuerySize)
	if err := wire.NewReader(st, neuropb.MaxLedgerQuerySize).Read(q); err != nil {
		st.Reset()
		return
	}
	p, err := peer.IDFromBytes(q.GetPeer())
	if err != nil {
		_ = w.Write(&neuropb.LedgerStatus{Error: fmt.Sprintf("peer: %v", err)})
		return
	}
	_ = w.Write(s.status(p))
}

// Submit submits a transaction someone else signed (a wallet's, relayed by
// this node): into the mempool on a validator, on the ledger topic
// elsewhere. It checks the signature, and what the sender's funds already
// rule out, first.
func (s *Service) Submit(ctx context.Context, tx *neuropb.LedgerTx) error {
	raw, err := EncodeTx(tx)
	if err != nil {
		return fmt.Errorf("ledger: encode: %w", err)
	}
	if _, err := DecodeTx(raw); err != nil {
		return err
	}
	sender, err := peer.IDFromBytes(tx.GetSender())
	if err != nil {
		return txErr(CodeMalformed, "sender: %v", err)
	}
	if s.chain != nil {
		return s.chain.Submit(raw)
	}
	st, err := s.Status(ctx, sender)
	if err != nil {
		return err
	}
	if tx.GetNonce() != st.GetNonce()+1 {
		return txErr(CodeBadNonce, "nonce %d, want %d", tx.GetNonce(), st.GetNonce()+1)
	}
	if err := precheck(st, tx); err != nil {
		return err
	}
	if err := s.topic.Publish(ctx, tx); err != nil {
		return fmt.Errorf("ledger: publish: %w", err)
	}
	return nil
}

// ChainView is the part of the chain's state that is not accounts, as this
// node last learned it: the escrows and the parameters.
type ChainView struct {
	Height  int64
	Escrows map[uint64]*Escrow
	Params  *neuropb.LedgerParams
}

// ChainState is the chain's escrows and parameters in the newest state
// that a signed header commits to (what every node can prove, so that an
// escrow this node sees, its peers see too): from the local chain on a
// validator, else from a validator's proven answer. Do not edit it.
func (s *Service) ChainState(ctx context.Context) (*ChainView, error) {
	if s.chain != nil {
		st, _, _, err := s.chain.proven()
		if err != nil {
			return nil, err
		}
		return &ChainView{Height: st.Height, Escrows: st.Escrows, Params: st.params}, nil
	}
	st, err := s.Status(ctx, s.h.ID())
	if err != nil {
		return nil, err
	}
	state, _, err := globalState(st.GetProof().GetGlobal().GetValue())
	if err != nil {
		return nil, fmt.Errorf("ledger: %w", err)
	}
	return &ChainView{Height: state.Height, Escrows: state.Escrows, Params: state.params}, nil
}

// Escrow is escrow id as the chain holds it (nil: none, or not yet
// applied), and the chain's view it comes from (height, parameters).
func (s *Service) Escrow(ctx context.Context, id uint64) (*Escrow, *ChainView, error) {
	c, err := s.ChainState(ctx)
	if err != nil {
		return nil, nil, err
	}
	e := c.Escrows[id]
	if e != nil {
		cp := *e
		e = &cp
	}
	return e, c, nil
}

// WaitEscrow polls until escrow id is applied, for at most ctx's life.
func (s *Service) WaitEscrow(ctx context.Context, id uint64) (*Escrow, *ChainView, error) {
	for {
		e, p, err := s.Escrow(ctx, id)
		if err == nil && e != nil {
			return e, p, nil
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("escrow %d not applied: %w", id, ctx.Err())
			}
			return nil, nil, err
		case <-time.After(100 * time.Millisecond):
		}
	}
}
