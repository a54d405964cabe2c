module github.com/tally-engine/tally/ffi/go

// 1.19 is Debian's golang-go; the package uses nothing newer (no runtime.Pinner: requests
// are assembled on the C side, see shim.h).
go 1.19
