package main

import "fmt"

// apiError is an error the client sees in the OpenAI error shape:
// {"error":{"message","type","param","code"}} with the given HTTP status.
type apiError struct {
	status  int
	typ     string // invalid_request_error, authentication_error, rate_limit_error, api_error
	code    string // machine-readable code, "" for null
	param   string // offending parameter, "" for null
	message string
}

func (e *apiError) Error() string { return e.message }

// invalidRequest is a 400 naming the offending parameter.
func invalidRequest(param, format string, args ...any) *apiError {
	return &apiError{status: 400, typ: "invalid_request_error", param: param, message: fmt.Sprintf(format, args...)}
}
