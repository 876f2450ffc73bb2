package node

import "errors"

// Errors returned by this package. Compare with errors.Is.
var (
	// ErrNotInitialized means the home has no config or identity: run
	// `neurod init` first.
	ErrNotInitialized = errors.New("not initialized")
	// ErrExists means init would overwrite an existing file.
	ErrExists = errors.New("already exists")
	// ErrLocked means another neurod process uses the home.
	ErrLocked = errors.New("in use by another neurod process")
	// ErrBadKey means the identity key file is unreadable as a key.
	ErrBadKey = errors.New("corrupt identity key")
)
