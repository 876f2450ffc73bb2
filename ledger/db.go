package ledger

import (
	"sync/atomic"

	dbm "github.com/cometbft/cometbft-db"
	cmtcfg "github.com/cometbft/cometbft/config"
)

// closedReadsEmpty opens CometBFT's databases as its default provider does,
// each wrapped so that once closed it reads as empty instead of failing.
//
// CometBFT's consensus reactor runs a goroutine per peer
// (queryMaj23Routine) that the node's Stop does not wait for: between two
// of its sleeps it may read the block store after the node has closed the
// store's database, and the block store panics on any read error
// ("leveldb: closed"), taking the whole process down with it — a node that
// stops its ledger while a peer is catching up crashes. A read that fails
// only because the database is closed answers "not found" here, which the
// routine takes as nothing to send. Every other error still reaches
// CometBFT as it is.
func closedReadsEmpty(ctx *cmtcfg.DBContext) (dbm.DB, error) {
	db, err := cmtcfg.DefaultDBProvider(ctx)
	if err != nil {
		return nil, err
	}
	return &closableDB{DB: db}, nil
}

type closableDB struct {
	dbm.DB
	closed atomic.Bool
}

func (d *closableDB) Close() error {
	d.closed.Store(true)
	return d.DB.Close()
}

func (d *closableDB) Get(key []byte) ([]byte, error) {
	v, err := d.DB.Get(key)
	if err != nil && d.closed.Load() {
		return nil, nil
	}
	return v, err
}

func (d *closableDB) Has(key []byte) (bool, error) {
	ok, err := d.DB.Has(key)
	if err != nil && d.closed.Load() {
		return false, nil
	}
	return ok, err
}
