package tally

// NewErrorForTest lets the external tests reach the status mapping: the error a call that
// returned status with message gives.
func NewErrorForTest(op string, status uint32, message string) error {
	return newError(op, Status(status), message)
}

// ConsumeManyEntryErrorForTest is the error of ConsumeMany's entry index had the library
// refused it with status.
func ConsumeManyEntryErrorForTest(index int, status uint32, request Request) error {
	return newError("ConsumeMany", Status(status), entryDetail(index, Status(status), &request, ""))
}
