package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxBodyBytes caps request bodies; images arrive inline as base64.
const maxBodyBytes = 32 << 20

// keepaliveInterval is the SSE comment cadence during upstream silence
// (SPEC §4).
const keepaliveInterval = 15 * time.Second

// apiError is an error the client sees in the OpenAI error shape:
// {"error":{"message","type","param","code"}} with the given HTTP status.
type apiError struct {
	status  int
	typ     string // invalid_request_error, authentication_error, rate_limit_error, api_error
	code    string // machine-readable code, "" for null
	param   string // offending parameter, "" for null
	message string
	header  http.Header // extra response headers: Retry-After, x-codex-*
}

func (e *apiError) Error() string { return e.message }

// invalidRequest is a 400 naming the offending parameter.
func invalidRequest(param, format string, args ...any) *apiError {
	return &apiError{status: 400, typ: "invalid_request_error", param: param, message: fmt.Sprintf(format, args...)}
}

// newServer builds the proxy's HTTP handler: the routes of addRoutes behind
// the middleware that every request passes.
func newServer(logger *slog.Logger, cfg config, auth *authStore, sessions *sessionStore, up *upstream, models *catalog, fixedPrompt string) http.Handler {
	mux := http.NewServeMux()
	p := &prompts{mode: cfg.instructions, fixed: fixedPrompt, models: models, needs: map[string]bool{}}
	if strings.HasPrefix(cfg.instructions, "file:") {
		p.mode = "file"
	}
	addRoutes(mux, cfg, auth, sessions, up, models, p)
	var h http.Handler = jsonNotFound(mux)
	h = requireKey(cfg.apiKey, h)
	h = checkHost(cfg.apiKey, cfg.host, h)
	h = logRequests(logger, h)
	return h
}

// addRoutes is the whole API surface (SPEC §3).
func addRoutes(mux *http.ServeMux, cfg config, auth *authStore, sessions *sessionStore, up *upstream, models *catalog, p *prompts) {
	codex := func(h http.Handler) http.Handler {
		if cfg.codexEnabled {
			return h
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeError(w, r, &apiError{status: 503, typ: "api_error", code: "codex_disabled",
				message: "the /codex routes are disabled: run `ccproxy config codex --enable` and restart `ccproxy serve`"})
		})
	}
	turn := codex(handleTurn(sessions, up, p, cfg.reasoning, cfg.keepalive))
	for _, path := range []string{"/codex", "/codex/v1", "/codex/{session_id}"} {
		mux.Handle("POST "+path+"/chat/completions", turn)
		mux.Handle("POST "+path+"/responses", turn)
	}
	mux.Handle("GET /codex/models", codex(handleModels(models)))
	mux.Handle("GET /codex/v1/models", codex(handleModels(models)))
	mux.Handle("GET /codex/sessions", codex(handleSessionList(sessions)))
	mux.Handle("GET /codex/sessions/{id}", codex(handleSessionGet(sessions)))
	mux.Handle("DELETE /codex/sessions/{id}", codex(handleSessionDelete(sessions)))
	mux.Handle("GET /codex/usage", codex(handleUsage(up)))
	mux.Handle("GET /health", handleHealth(auth))
}

// reqInfo is what the request log line reports; handlers fill in the model.
type reqInfo struct {
	id     string
	logger *slog.Logger
	model  string
	stream bool
}

// reqKey is the context key of *reqInfo.
type reqKey struct{}

// info returns the request's log record.
func info(r *http.Request) *reqInfo {
	if ri, ok := r.Context().Value(reqKey{}).(*reqInfo); ok {
		return ri
	}
	return &reqInfo{logger: slog.New(slog.DiscardHandler)}
}

// logRequests gives each request an id, echoed as X-Request-Id, "used to
// correlate user-visible errors with server logs" (tailscale tsweb), and logs
// one line when it ends.
func logRequests(logger *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		var b [8]byte
		rand.Read(b[:])
		ri := &reqInfo{id: hex.EncodeToString(b[:])}
		ri.logger = logger.With("req", ri.id)
		w.Header().Set("X-Request-Id", ri.id)
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r.WithContext(context.WithValue(r.Context(), reqKey{}, ri)))
		level := slog.LevelInfo
		if sw.status >= 500 {
			level = slog.LevelError
		}
		ri.logger.LogAttrs(r.Context(), level, "request",
			slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.Int("status", sw.status),
			slog.Int64("bytes", sw.bytes), slog.Duration("duration", time.Since(start)),
			slog.String("model", ri.model), slog.Bool("stream", ri.stream))
	})
}

// statusWriter records the status and size for the log line. Unwrap lets
// http.ResponseController reach the connection to flush streams.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// checkHost refuses requests addressed to a name other than this machine, so
// a web page cannot reach the proxy through DNS rebinding. With an API key
// the key is the protection and any Host is accepted.
func checkHost(apiKey secret, bound string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		if apiKey == "" && !isLoopback(host) && host != bound {
			writeError(w, r, &apiError{status: 403, typ: "invalid_request_error", code: "host_not_allowed",
				message: fmt.Sprintf("Host %q is not allowed: ccproxy answers only requests addressed to localhost (DNS-rebinding protection); set --api-key to accept other names", r.Host)})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// requireKey enforces --api-key, comparing in constant time.
func requireKey(key secret, next http.Handler) http.Handler {
	if key == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok {
			got = r.Header.Get("X-Api-Key")
		}
		if subtle.ConstantTimeCompare([]byte(got), []byte(key)) != 1 {
			writeError(w, r, &apiError{status: 401, typ: "authentication_error", code: "invalid_api_key",
				message: "missing or wrong API key: send Authorization: Bearer <key> with the key given to --api-key"})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// jsonNotFound answers unmatched paths and methods in the OpenAI error shape,
// keeping the mux's status and Allow header.
func jsonNotFound(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h, pattern := mux.Handler(r)
		if pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		c := &captureWriter{header: http.Header{}}
		h.ServeHTTP(c, r)
		if allow := c.header.Get("Allow"); allow != "" {
			w.Header().Set("Allow", allow)
		}
		if c.status == http.StatusMethodNotAllowed {
			writeError(w, r, &apiError{status: 405, typ: "invalid_request_error", code: "method_not_allowed",
				message: fmt.Sprintf("%s is not allowed on %s (allowed: %s)", r.Method, r.URL.Path, c.header.Get("Allow"))})
			return
		}
		writeError(w, r, &apiError{status: 404, typ: "invalid_request_error", code: "not_found",
			message: fmt.Sprintf("no route for %s %s: see GET /codex/v1/models, POST /codex/v1/chat/completions, POST /codex/v1/responses", r.Method, r.URL.Path)})
	})
}

// captureWriter records what the mux's own 404/405 handler decided.
type captureWriter struct {
	header http.Header
	status int
}

func (c *captureWriter) Header() http.Header         { return c.header }
func (c *captureWriter) Write(b []byte) (int, error) { return len(b), nil }
func (c *captureWriter) WriteHeader(status int)      { c.status = status }

// writeError is the one place errors become responses.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	e := toAPIError(err)
	ri := info(r)
	if e == nil { // the client went away; nobody is left to answer
		ri.logger.Debug("client canceled", "err", err)
		return
	}
	if e.status >= 500 {
		ri.logger.Error("request failed", "err", err)
	}
	for k, v := range e.header {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.status)
	w.Write(errorBody(e))
}

// toAPIError maps any error to its client-facing form; nil when the client
// canceled the request.
func toAPIError(err error) *apiError {
	var ae *apiError
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &tooBig):
		return &apiError{status: 413, typ: "invalid_request_error", code: "request_too_large",
			message: fmt.Sprintf("request body is larger than %d bytes", tooBig.Limit)}
	case errors.Is(err, errLoginRequired):
		return &apiError{status: 401, typ: "authentication_error", code: "login_required", message: err.Error()}
	case errors.Is(err, context.Canceled):
		return nil
	case errors.Is(err, context.DeadlineExceeded):
		return &apiError{status: 504, typ: "api_error", code: "timeout", message: "the Codex backend did not answer in time"}
	default:
		return &apiError{status: 500, typ: "api_error", code: "internal_error", message: err.Error()}
	}
}

// errorObject is the OpenAI error object; empty code and param are null.
func errorObject(e *apiError) map[string]any {
	orNull := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	return map[string]any{"message": e.message, "type": e.typ, "param": orNull(e.param), "code": orNull(e.code)}
}

// errorBody encodes the OpenAI error shape.
func errorBody(e *apiError) []byte {
	b, _ := json.Marshal(map[string]any{"error": errorObject(e)})
	return b
}

// writeJSON sends v (or raw JSON bytes) with status 200.
func writeJSON(w http.ResponseWriter, v any) {
	b, ok := v.([]byte)
	if !ok {
		b, _ = json.Marshal(v)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

// handleHealth reports liveness and whether credentials are present.
func handleHealth(auth *authStore) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"status": "ok", "logged_in": auth.loggedIn()})
	})
}

// handleTurn answers Chat Completions and Responses requests: one upstream
// call, one event loop, two output formats. A body with "messages" is a chat
// request on either path (SPEC §5.2).
func handleTurn(sessions *sessionStore, up *upstream, p *prompts, reasoning reasoningMode, keepalive time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ri := info(r)
		body, err := readBody(w, r)
		if err != nil {
			writeError(w, r, err)
			return
		}
		if ri.logger.Enabled(r.Context(), slog.LevelDebug) {
			ri.logger.Debug("request body", "body", redact(body))
		}
		c, err := parseCall(body, strings.HasSuffix(r.URL.Path, "/chat/completions"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		ri.model, ri.stream = c.req.Model, c.stream

		sid, sess, err := openSession(r, sessions, c)
		if err != nil {
			writeError(w, r, err)
			return
		}
		sent := c.req.Input
		if sess != nil {
			defer sess.release()
			if sent, err = sess.input(c.req.Input); err != nil {
				writeError(w, r, err)
				return
			}
		}
		c.req.Input = sent
		c.req.PromptCacheKey = cmp.Or(c.req.PromptCacheKey, sid)
		h := w.Header()
		h.Set("X-Session-Id", sid)
		if len(c.ignored) > 0 {
			h.Set("X-Ccproxy-Ignored-Params", strings.Join(c.ignored, ", "))
		}
		// The Codex CLI's turn headers pass through (codex-backend.md §0,
		// §3.2): the backend may route a turn by x-codex-turn-state.
		uh := http.Header{"Accept": {"text/event-stream"}, "Session-Id": {sid}}
		for k, v := range r.Header {
			if strings.HasPrefix(k, "X-Codex-") || k == "Thread-Id" || k == "X-Client-Request-Id" {
				uh[k] = v
			}
		}
		resp, err := p.send(r.Context(), up, &c.req, uh)
		if err != nil {
			writeError(w, r, err)
			return
		}
		defer resp.Body.Close()
		for k, v := range codexHeaders(resp.Header) {
			h[k] = v
		}
		id, created := "chatcmpl-"+ri.id, time.Now().Unix()
		var t turn
		commit := func() error {
			if sess == nil {
				return nil
			}
			var rs struct {
				ID string `json:"id"`
			}
			json.Unmarshal(t.response, &rs)
			if err := sess.commit(sent, t.output, rs.ID); err != nil {
				return &apiError{status: 500, typ: "api_error", code: "session_not_saved",
					message: fmt.Sprintf("the answer could not be saved to session %q, which still holds the previous turns (%v); check the disk space and permissions of the sessions directory", sid, err)}
			}
			return nil
		}
		if !c.stream {
			err := pump(resp, &t, func(string, []byte) error { return nil }, func() error { return nil })
			if err == nil {
				err = commit()
			}
			if err != nil {
				writeError(w, r, err)
				return
			}
			var out []byte
			if c.chat {
				out = chatCompletion(&t, id, created, c.req.Model, reasoning, c.jsonMode)
			} else {
				out = t.responseObject()
			}
			if ri.logger.Enabled(r.Context(), slog.LevelDebug) {
				ri.logger.Debug("response body", "body", redact(out))
			}
			writeJSON(w, out)
			return
		}

		sw := startSSE(w, keepalive)
		defer sw.close()
		var lastType string
		var lastData []byte
		var onEvent func(typ string, data []byte) error
		if c.chat {
			cs := newChatStream(id, created, c.req.Model, reasoning, c.jsonMode, c.includeUsage)
			emit := func(chunk []byte) error { return sw.event("", chunk) }
			onEvent = func(typ string, data []byte) error { return cs.event(typ, data, emit) }
		} else {
			// Native clients get the backend's events as they are; the
			// terminal one waits until the session is saved (below).
			onEvent = func(typ string, data []byte) error {
				if t.completed {
					lastType, lastData = typ, append([]byte(nil), data...)
					return nil
				}
				return sw.event(typ, data)
			}
		}
		err = pump(resp, &t, onEvent, sw.flush)
		if err == nil {
			err = commit()
		}
		if err != nil {
			// A native client already has the backend's response.failed,
			// which the Codex CLI maps to specific errors; everything else
			// ends with an error event of ours.
			if e := toAPIError(err); e != nil && (c.chat || t.err == nil) {
				ri.logger.Warn("stream failed", "err", err)
				sw.event(errorEvent(e, c.chat)) // a no-op when the client is gone
			}
			sw.flush()
			return
		}
		if c.chat {
			sw.event("", []byte("[DONE]"))
		} else {
			sw.event(lastType, lastData)
		}
		sw.flush()
	})
}

// call is one translated request, whichever API it came in.
type call struct {
	req                upstreamRequest
	ignored            []string
	chat               bool // answer in Chat Completions format
	stream             bool
	includeUsage       bool
	jsonMode           bool
	previousResponseID string
}

// parseCall reads a request body as Chat Completions (chat paths, or a body
// with "messages" and no "input") or as a native Responses request.
func parseCall(body []byte, chatPath bool) (call, error) {
	if !chatPath {
		rc, err := parseResponses(body)
		if err != nil || !rc.chatBody {
			return call{req: rc.req, ignored: rc.ignored, stream: rc.stream, previousResponseID: rc.previousResponseID}, err
		}
	}
	cc, err := parseChat(body)
	return call{req: cc.req, ignored: cc.ignored, chat: true, stream: cc.stream, includeUsage: cc.includeUsage, jsonMode: cc.jsonMode}, err
}

// openSession finds the request's session: the one behind
// previous_response_id, or the one named by the path or a header, locked for
// this turn. A chat request without a session is ephemeral (nil session):
// chat clients resend their history and cannot name a stored turn, so
// storing it would only cost disk writes and session slots. A Responses
// request without one gets a new stored session, so previous_response_id
// can refer to it later.
func openSession(r *http.Request, sessions *sessionStore, c call) (string, *session, error) {
	if c.previousResponseID != "" {
		sess, err := sessions.acquireResponse(r.Context(), c.previousResponseID)
		if err != nil {
			return "", nil, err
		}
		return sess.id(), sess, nil
	}
	// The Codex CLI sends "session-id" (2026) or "session_id" (2025).
	id := cmp.Or(r.PathValue("session_id"), r.Header.Get("Session-Id"), r.Header.Get("Session_id"), r.Header.Get("X-Session-Id"))
	if id == "" && c.chat {
		return newUUID(), nil, nil
	}
	id = cmp.Or(id, newUUID())
	sess, err := sessions.acquire(r.Context(), id)
	return id, sess, err
}

// newUUID returns a random (version 4) UUID, the id the Codex CLI uses for
// sessions.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// readBody reads the request body up to maxBodyBytes.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	var buf bytes.Buffer
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	return buf.Bytes(), err
}

// pump reads the upstream stream to its end, feeding every event to the turn
// and to onEvent, and calling flush whenever no more upstream bytes are
// waiting. It fails if the stream breaks or ends before a terminal event.
func pump(resp *http.Response, t *turn, onEvent func(typ string, data []byte) error, flush func() error) error {
	rd := newSSEReader(resp.Body)
	for {
		name, data, err := rd.next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("stream closed before response.completed")
			}
			return &apiError{status: 502, typ: "api_error", code: "upstream_stream_error",
				message: "the Codex backend stream broke: " + err.Error()}
		}
		typ := eventType(name, data)
		t.observe(typ, data)
		if err := onEvent(typ, data); err != nil {
			return err
		}
		if t.err != nil {
			return t.err
		}
		if t.completed {
			return nil // nothing follows a terminal event; don't wait for EOF
		}
		if !rd.buffered() {
			if err := flush(); err != nil {
				return err
			}
		}
	}
}

// errorEvent is the final event of a stream that failed after its first
// byte: it carries an "error" object (the OpenAI SDKs raise it) and is
// never followed by [DONE] or response.completed.
func errorEvent(e *apiError, chat bool) (string, []byte) {
	if chat {
		return "", errorBody(e)
	}
	// The Responses stream's own error event shape, with the error object
	// beside it.
	b, _ := json.Marshal(map[string]any{"type": "error", "code": e.code, "message": e.message, "error": errorObject(e)})
	return "error", b
}

// redactPattern finds JSON string values of secret-looking keys.
var redactPattern = regexp.MustCompile(`(?i)("[^"]*(?:token|secret|password|api_?key|authorization)[^"]*"\s*:\s*)"(?:[^"\\]|\\.)*"`)

// redact hides secret-looking values in a body logged at debug level.
func redact(body []byte) string {
	if len(body) > 16<<10 {
		body = body[:16<<10]
	}
	return redactPattern.ReplaceAllString(string(body), `$1"REDACTED"`)
}

// eventTypes maps every event name ccproxy acts on to a constant string, so
// naming an event costs no allocation on the streaming path.
var eventTypes = func() map[string]string {
	m := map[string]string{}
	for _, t := range []string{
		"response.created", "response.in_progress", "response.completed", "response.done",
		"response.incomplete", "response.failed", "error",
		"response.output_item.added", "response.output_item.done",
		"response.content_part.added", "response.content_part.done",
		"response.output_text.delta", "response.output_text.done",
		"response.reasoning_summary_part.added", "response.reasoning_summary_part.done",
		"response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
		"response.reasoning_text.delta", "response.reasoning_text.done",
		"response.function_call_arguments.delta", "response.function_call_arguments.done",
	} {
		m[t] = t
	}
	return m
}()

// eventType names an upstream event: its SSE event field, or the JSON "type"
// of a data-only event (the Codex CLI accepts both, codex-backend.md §0).
func eventType(name, data []byte) string {
	if len(name) > 0 {
		if t, ok := eventTypes[string(name)]; ok {
			return t
		}
		return string(name)
	}
	var v struct {
		Type string `json:"type"`
	}
	json.Unmarshal(data, &v)
	if t, ok := eventTypes[v.Type]; ok {
		return t
	}
	return v.Type
}

// prompts applies the --instructions mode (SPEC §5.4).
type prompts struct {
	mode   string // auto, catalog, file or none
	fixed  string // the file's text in file mode
	models *catalog
	mu     sync.Mutex
	needs  map[string]bool // auto mode: models the backend wants base instructions for
}

// send posts req to the backend with instructions per the mode. In auto mode
// the client's instructions travel as a leading developer message, as the
// Codex CLI sends its own prompt; if the backend insists on instructions
// (2025 and early-2026 behaviour, codex-backend.md §6.2) the model's
// base_instructions from the catalog are sent once more and kept for it.
func (p *prompts) send(ctx context.Context, up *upstream, req *upstreamRequest, header http.Header) (*http.Response, error) {
	if p.mode != "none" {
		if req.Instructions != nil && *req.Instructions != "" {
			msg, _ := json.Marshal(map[string]any{"type": "message", "role": "developer",
				"content": []map[string]string{{"type": "input_text", "text": *req.Instructions}}})
			req.Input = append([]json.RawMessage{msg}, req.Input...)
		}
		req.Instructions = nil
		p.mu.Lock()
		need := p.needs[req.Model]
		p.mu.Unlock()
		switch {
		case p.mode == "file":
			req.Instructions = &p.fixed
		case p.mode == "catalog" || need:
			text, err := p.models.instructions(ctx, req.Model)
			if err != nil {
				return nil, err
			}
			req.Instructions = &text
		}
	}
	resp, err := post(ctx, up, req, header)
	var ae *apiError
	if p.mode == "auto" && req.Instructions == nil && errors.As(err, &ae) && ae.status == 400 &&
		strings.Contains(strings.ToLower(ae.message), "instructions are") {
		text, ierr := p.models.instructions(ctx, req.Model)
		if ierr != nil {
			return nil, fmt.Errorf("%w (and fetching the model's base instructions failed: %v)", err, ierr)
		}
		p.mu.Lock()
		p.needs[req.Model] = true
		p.mu.Unlock()
		req.Instructions = &text
		return post(ctx, up, req, header)
	}
	return resp, err
}

// post sends one turn to POST {upstream}/responses.
func post(ctx context.Context, up *upstream, req *upstreamRequest, header http.Header) (*http.Response, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	return up.do(ctx, http.MethodPost, "/responses", body, header)
}

// catalogModel is the part of a backend catalog entry ccproxy uses.
type catalogModel struct {
	Slug             string `json:"slug"`
	DisplayName      string `json:"display_name,omitempty"`
	Visibility       string `json:"visibility,omitempty"`
	BaseInstructions string `json:"base_instructions,omitempty"`
}

// fallbackModels is served when the catalog has never been fetched
// (codex-backend.md §3.5, late 2026).
var fallbackModels = []catalogModel{{Slug: "gpt-5.5"}, {Slug: "gpt-5.4"}, {Slug: "gpt-5.4-mini"}}

// catalog is the backend's model list, GET {upstream}/models, cached in
// memory for an hour and on disk (models.json) with its ETag.
type catalog struct {
	up      *upstream
	path    string
	now     func() time.Time
	mu      sync.Mutex
	etag    string
	models  []catalogModel
	checked time.Time
}

// newCatalog returns a catalog cached at path.
func newCatalog(up *upstream, path string, now func() time.Time) *catalog {
	return &catalog{up: up, path: path, now: now}
}

// cachedCatalog is the models.json layout.
type cachedCatalog struct {
	ETag   string         `json:"etag"`
	Models []catalogModel `json:"models"`
}

// list returns the models, refreshing the cache when it is an hour old.
// Without any catalog it returns the built-in fallback and the fetch error.
func (c *catalog) list(ctx context.Context) ([]catalogModel, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.models == nil {
		if b, err := os.ReadFile(c.path); err == nil {
			var cc cachedCatalog
			if json.Unmarshal(b, &cc) == nil {
				c.etag, c.models = cc.ETag, cc.Models
			}
		}
	}
	if c.models != nil && c.now().Sub(c.checked) < time.Hour {
		return c.models, nil
	}
	err := c.fetch(ctx)
	if c.models == nil {
		return fallbackModels, err
	}
	return c.models, nil
}

// fetch asks the backend for the catalog, conditionally on the ETag.
func (c *catalog) fetch(ctx context.Context) error {
	h := http.Header{"Accept": {"application/json"}}
	if c.etag != "" && c.models != nil {
		h.Set("If-None-Match", c.etag)
	}
	resp, err := c.up.do(ctx, http.MethodGet, "/models?client_version="+codexVersion, nil, h)
	if err != nil {
		return fmt.Errorf("fetch model catalog: %w", err)
	}
	defer resp.Body.Close()
	c.checked = c.now()
	if resp.StatusCode == http.StatusNotModified {
		return nil
	}
	var cc cachedCatalog
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(&cc); err != nil || len(cc.Models) == 0 {
		return fmt.Errorf("fetch model catalog: unexpected reply (%v)", err)
	}
	cc.ETag = resp.Header.Get("Etag")
	c.etag, c.models = cc.ETag, cc.Models
	b, _ := json.Marshal(cc)
	return writeFileAtomic(c.path, b)
}

// instructions returns the model's base_instructions from the catalog.
func (c *catalog) instructions(ctx context.Context, model string) (string, error) {
	models, err := c.list(ctx)
	for _, m := range models {
		if m.Slug == model && m.BaseInstructions != "" {
			return m.BaseInstructions, nil
		}
	}
	return "", &apiError{status: 502, typ: "api_error", code: "instructions_unavailable",
		message: fmt.Sprintf("the backend wants instructions for %q but the model catalog has none for it (%v); use --instructions file:PATH", model, err)}
}

// handleModels lists the catalog's visible models in OpenAI format.
func handleModels(models *catalog) http.Handler {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		list, err := models.list(r.Context())
		if err != nil {
			info(r).logger.Warn("serving cached or built-in models", "err", err)
		}
		data := []model{}
		for _, m := range list {
			if m.Visibility != "hide" {
				data = append(data, model{ID: m.Slug, Object: "model", OwnedBy: "openai"})
			}
		}
		writeJSON(w, map[string]any{"object": "list", "data": data})
	})
}

// handleSessionList lists live sessions.
func handleSessionList(sessions *sessionStore) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		list, err := sessions.list()
		if err != nil {
			writeError(w, r, err)
			return
		}
		if list == nil {
			list = []sessionInfo{}
		}
		writeJSON(w, map[string]any{"object": "list", "data": list})
	})
}

// handleSessionGet shows one session and its transcript.
func handleSessionGet(sessions *sessionStore) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		si, items, err := sessions.get(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		writeJSON(w, struct {
			sessionInfo
			Transcript []json.RawMessage `json:"transcript"`
		}{si, items})
	})
}

// handleSessionDelete drops a session.
func handleSessionDelete(sessions *sessionStore) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if err := sessions.delete(id); err != nil {
			writeError(w, r, err)
			return
		}
		writeJSON(w, map[string]any{"id": id, "object": "session", "deleted": true})
	})
}

// handleUsage reports the latest rate-limit snapshot from the backend's
// x-codex-* headers (codex-backend.md §5.2).
func handleUsage(up *upstream) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hp := up.usage.Load()
		if hp == nil {
			writeJSON(w, map[string]any{"available": false})
			return
		}
		h := *hp
		num := func(name string) any {
			f, err := strconv.ParseFloat(h.Get("X-Codex-"+name), 64)
			if err != nil {
				return nil
			}
			return f
		}
		window := func(prefix string) any {
			if h.Get("X-Codex-"+prefix+"-Used-Percent") == "" && h.Get("X-Codex-"+prefix+"-Window-Minutes") == "" {
				return nil
			}
			return map[string]any{"used_percent": num(prefix + "-Used-Percent"), "window_minutes": num(prefix + "-Window-Minutes"),
				"resets_at": num(prefix + "-Reset-At"), "resets_in_seconds": num(prefix + "-Reset-After-Seconds")}
		}
		flag := func(name string) any {
			b, err := strconv.ParseBool(strings.ToLower(h.Get("X-Codex-Credits-" + name)))
			if err != nil {
				return nil
			}
			return b
		}
		writeJSON(w, map[string]any{
			"available": true, "plan": h.Get("X-Codex-Plan-Type"), "active_limit": h.Get("X-Codex-Active-Limit"),
			"primary": window("Primary"), "secondary": window("Secondary"),
			"credits": map[string]any{"has_credits": flag("Has-Credits"), "unlimited": flag("Unlimited"), "balance": num("Credits-Balance")},
		})
	})
}
