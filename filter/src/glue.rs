//! The proxy-wasm glue: adapts Envoy's callbacks to [`Exchange`] through [`GlueHost`].
//!
//! Hostcalls go through `proxy_wasm::hostcalls::*`, which return `Result`, and maps are
//! read as bytes (`get_map_bytes`): the SDK's string helpers `unwrap()` and would trap the
//! VM on a non-UTF-8 header value. A failed hostcall becomes "absent" plus a log line.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::config::Config;
use crate::exchange::{Exchange, Flow, OPAQUE_VALUE_PREFIX};
use crate::host::{Host, Level, Metric, StoreCall, StoreReply, UpstreamCall};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("idemgate filter panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(IdemRoot {
            context_id,
            config: None,
            metrics: Rc::new(Metrics::default()),
            turns: Rc::new(RootTurns::default()),
            callouts: HashMap::new(),
        })
    });
}}

/// Counter ids returned by `define_metric`, indexed by [`Metric::index`] (0 = undefined).
#[derive(Default)]
struct Metrics {
    ids: [Cell<u32>; Metric::ALL.len()],
}

impl Metrics {
    fn define(&self) {
        for m in Metric::ALL {
            if let (Some(cell), Ok(id)) = (
                self.ids.get(m.index()),
                hostcalls::define_metric(MetricType::Counter, m.name()),
            ) {
                cell.set(id);
            }
        }
    }

    fn increment(&self, metric: Metric, delta: i64) {
        let id = self.ids.get(metric.index()).map_or(0, Cell::get);
        if id != 0 {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }
}

/// A stream's exchange, shared with the root context while a detached execution runs.
type SharedExchange = Rc<RefCell<Exchange>>;

/// Exchanges waiting for a root turn, and the wake-up that brings it.
///
/// A callout is owned (in the SDK) by the context whose callback dispatched it, and its
/// answer is dropped once that context is gone. A detached execution must outlive the
/// client's stream, so its upstream call is dispatched from a root callback: the stream
/// queues its exchange here and enqueues a byte on this worker's shared queue, whose
/// `on_queue_ready` runs on the root context in the same event loop turn's aftermath
/// (Envoy posts it to the worker's dispatcher; no timer, no polling).
#[derive(Default)]
struct RootTurns {
    /// This root context's shared queue (unique name per VM), `None` if it could not be
    /// registered: detached executions then dispatch from the stream itself (they still
    /// run, but a client that leaves cancels them).
    queue_id: Cell<Option<u32>>,
    /// `(stream context id, exchange)` in arrival order.
    pending: RefCell<Vec<(u32, SharedExchange)>>,
    /// Exchanges with a `complete`/`release` retry waiting for its time; the root ticks
    /// every [`RETRY_TICK_MS`] while any is here, and not at all otherwise.
    timers: RefCell<Vec<(u32, SharedExchange)>>,
}

/// Root tick period while retries wait, ms.
const RETRY_TICK_MS: u64 = 50;

impl RootTurns {
    /// Adds an exchange that asked for root ticks; starts the ticks if they were off.
    fn add_timer(&self, stream_id: u32, shared: &SharedExchange) {
        let mut timers = self.timers.borrow_mut();
        if timers.iter().any(|(_, e)| Rc::ptr_eq(e, shared)) {
            return;
        }
        if timers.is_empty() {
            let _ = hostcalls::set_tick_period(Duration::from_millis(RETRY_TICK_MS));
        }
        timers.push((stream_id, shared.clone()));
    }
}

struct IdemRoot {
    context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    turns: Rc<RootTurns>,
    /// Root-owned callouts of detached executions: token -> (stream context id, exchange).
    callouts: HashMap<u32, (u32, SharedExchange)>,
}

impl IdemRoot {
    /// Runs `f` on a stream's exchange from a root callback: the effective context is the
    /// stream's while it lives (local replies reach its client), and the root's again
    /// afterwards. A callout the exchange then waits for is routed back to it.
    fn with_exchange(
        &mut self,
        stream_id: u32,
        shared: &SharedExchange,
        f: impl FnOnce(&mut Exchange, &GlueHost<'_>),
    ) {
        let alive = hostcalls::set_effective_context(stream_id).is_ok();
        let host = GlueHost {
            context_id: stream_id,
            root_id: self.context_id,
            config: self.config.as_deref(),
            metrics: &self.metrics,
            stream_alive: alive,
        };
        match shared.try_borrow_mut() {
            Ok(mut exchange) => {
                if !alive {
                    exchange.on_done(&host);
                }
                f(&mut exchange, &host);
                if let Some(token) = exchange.awaiting_root_callout() {
                    self.callouts.insert(token, (stream_id, shared.clone()));
                }
                if exchange.take_timer_request() {
                    self.turns.add_timer(stream_id, shared);
                }
            }
            Err(_) => log(
                Level::Error,
                "idemgate: an exchange was busy during a root turn; skipped",
            ),
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }
}

impl Context for IdemRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        // Answers to reports dispatched from root turns are not routed anywhere.
        let Some((stream_id, shared)) = self.callouts.remove(&token_id) else {
            return;
        };
        let reply = read_reply(num_headers, body_size);
        self.with_exchange(stream_id, &shared, |exchange, host| {
            exchange.on_store_reply(host, token_id, reply);
        });
    }
}

impl RootContext for IdemRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log(
            Level::Info,
            &format!("idemgate filter {} starting", crate::VERSION),
        );
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(status) => {
                log(
                    Level::Error,
                    &format!("idemgate: cannot read the plugin configuration: {status:?}"),
                );
                return false;
            }
        };
        match Config::from_json(&bytes) {
            Ok(config) => {
                self.metrics.define();
                if self.turns.queue_id.get().is_none() {
                    let name = format!("idemgate.root-turns.{}", random_hex());
                    match hostcalls::register_shared_queue(&name) {
                        Ok(id) => self.turns.queue_id.set(Some(id)),
                        Err(status) => log(
                            Level::Warn,
                            &format!("idemgate: cannot register the root-turn queue ({status:?}); detached executions end with their client"),
                        ),
                    }
                }
                log(Level::Info, &format!(
                    "idemgate filter {} configured: config hash {}, {} route(s), store cluster {:?}",
                    crate::VERSION,
                    config.hash,
                    config.routes.len(),
                    config.store.cluster
                ));
                self.config = Some(Rc::new(config));
                true
            }
            Err(e) => {
                log(Level::Error, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let timers = std::mem::take(&mut *self.turns.timers.borrow_mut());
        let mut waiting = Vec::with_capacity(timers.len());
        for (stream_id, shared) in timers {
            self.with_exchange(stream_id, &shared, |exchange, host| exchange.on_tick(host));
            if shared.try_borrow().is_ok_and(|e| e.waits_for_timer()) {
                waiting.push((stream_id, shared));
            }
        }
        let mut timers = self.turns.timers.borrow_mut();
        // `with_exchange` may have re-added some (a retry that failed at once).
        for (stream_id, shared) in waiting {
            if !timers.iter().any(|(_, e)| Rc::ptr_eq(e, &shared)) {
                timers.push((stream_id, shared));
            }
        }
        if timers.is_empty() {
            let _ = hostcalls::set_tick_period(Duration::ZERO);
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        let pending = std::mem::take(&mut *self.turns.pending.borrow_mut());
        for (stream_id, shared) in pending {
            self.with_exchange(stream_id, &shared, |exchange, host| {
                exchange.on_root_turn(host);
            });
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(IdemHttp {
            env: HttpEnv {
                context_id,
                root_id: self.context_id,
                config: self.config.clone(),
                metrics: self.metrics.clone(),
                turns: self.turns.clone(),
            },
            exchange: Rc::new(RefCell::new(Exchange::new(self.config.clone()))),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct IdemHttp {
    env: HttpEnv,
    exchange: SharedExchange,
}

/// What a stream's [`GlueHost`] is built from.
struct HttpEnv {
    context_id: u32,
    root_id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    turns: Rc<RootTurns>,
}

impl HttpEnv {
    fn host(&self) -> GlueHost<'_> {
        GlueHost {
            context_id: self.context_id,
            root_id: self.root_id,
            config: self.config.as_deref(),
            metrics: &self.metrics,
            stream_alive: true,
        }
    }
}

impl IdemHttp {
    /// Runs one callback on the exchange, then hands it to the root if it asked for a
    /// root turn.
    fn run<T>(&mut self, fallback: T, f: impl FnOnce(&mut Exchange, &GlueHost<'_>) -> T) -> T {
        let host = self.env.host();
        let Ok(mut exchange) = self.exchange.try_borrow_mut() else {
            log(
                Level::Error,
                "idemgate: the exchange is busy in a root turn; callback passed through",
            );
            return fallback;
        };
        let out = f(&mut exchange, &host);
        if exchange.take_timer_request() {
            self.env
                .turns
                .add_timer(self.env.context_id, &self.exchange);
        }
        if exchange.take_root_turn_request() {
            match self.env.turns.queue_id.get() {
                Some(queue_id) => {
                    self.env
                        .turns
                        .pending
                        .borrow_mut()
                        .push((self.env.context_id, self.exchange.clone()));
                    if let Err(status) = hostcalls::enqueue_shared_queue(queue_id, Some(b"1")) {
                        log(
                            Level::Warn,
                            &format!("idemgate: root turn not signalled ({status:?}); the next one picks it up"),
                        );
                    }
                }
                // No queue: dispatch from the stream (a leaving client cancels the call).
                None => exchange.on_root_turn(&host),
            }
        }
        out
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

/// Reads a callout's answer; zero headers means it failed or timed out.
fn read_reply(num_headers: usize, body_size: usize) -> StoreReply {
    if num_headers == 0 {
        return StoreReply::default();
    }
    let headers = read_map(MapType::HttpCallResponseHeaders);
    let status = headers
        .iter()
        .find(|(n, _)| n == ":status")
        .and_then(|(_, v)| v.parse::<u16>().ok());
    let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
        Ok(b) => b.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    StoreReply {
        status,
        headers,
        body,
    }
}

/// 16 random bytes as 32 lowercase hex digits (WASI `random_get`); should the host refuse
/// randomness, the SHA-256 of the time and a per-VM counter, which is still unique.
fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        use sha2::{Digest, Sha256};
        thread_local!(static COUNTER: Cell<u64> = const { Cell::new(0) });
        let n = COUNTER.with(|c| {
            c.set(c.get().wrapping_add(1));
            c.get()
        });
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let digest = Sha256::digest(format!("{now}/{n}").as_bytes());
        bytes.copy_from_slice(&digest[..16]);
    }
    hex::encode(bytes)
}

impl Context for IdemHttp {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let reply = read_reply(num_headers, body_size);
        self.run((), |exchange, host| {
            exchange.on_store_reply(host, token_id, reply);
        });
    }

    fn on_done(&mut self) -> bool {
        self.run((), |exchange, host| exchange.on_done(host));
        true
    }
}

impl HttpContext for IdemHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.run(Flow::Continue, |e, h| {
            e.on_request_headers(h, end_of_stream)
        }))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.run(Flow::Continue, |e, h| {
            e.on_request_body(h, body_size, end_of_stream)
        }))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.run(Flow::Continue, |e, h| e.on_request_trailers(h)))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.run(Flow::Continue, |e, h| {
            e.on_response_headers(h, end_of_stream)
        }))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.run(Flow::Continue, |e, h| {
            e.on_response_body(h, body_size, end_of_stream)
        }))
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.run(Flow::Continue, |e, h| e.on_response_trailers(h)))
    }
}

/// [`Host`] over proxy-wasm hostcalls for one HTTP context.
struct GlueHost<'a> {
    context_id: u32,
    root_id: u32,
    config: Option<&'a Config>,
    metrics: &'a Metrics,
    /// False in a root turn whose stream has ended: stream hostcalls are skipped.
    stream_alive: bool,
}

impl GlueHost<'_> {
    /// Runs `f` with the root as the effective context (Envoy then owns the callout by the
    /// root and does not cancel it with the stream), then makes the stream effective again.
    fn as_root<T>(&self, f: impl FnOnce() -> T) -> T {
        let switched = hostcalls::set_effective_context(self.root_id).is_ok();
        let out = f();
        if switched && self.stream_alive {
            let _ = hostcalls::set_effective_context(self.context_id);
        }
        out
    }
}

fn log(level: Level, message: &str) {
    let level = match level {
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    };
    let _ = hostcalls::log(level, message);
}

/// A header map as `(name, value)` strings ([`header_value`]). A value that is not UTF-8
/// becomes [`OPAQUE_VALUE_PREFIX`] followed by its bytes in hex: injective (a NUL never appears in
/// a header value Envoy accepts), so two different credentials never hash to one scope,
/// and recognisable, so such a response header makes the response not replayable rather
/// than replayed altered. A failed read is an empty map.
fn read_map(map: MapType) -> Vec<(String, String)> {
    match hostcalls::get_map_bytes(map) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(n, v)| (n, header_value(v)))
            .collect(),
        Err(status) => {
            log(
                Level::Warn,
                &format!("idemgate: cannot read header map {map:?}: {status:?}"),
            );
            Vec::new()
        }
    }
}

/// A header value as a string: itself when UTF-8, else [`OPAQUE_VALUE_PREFIX`] and its
/// bytes in hex (see [`read_map`]).
fn header_value(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|e| format!("{OPAQUE_VALUE_PREFIX}{}", hex::encode(e.as_bytes())))
}

fn read_buffer(buffer: BufferType, max_bytes: usize) -> Vec<u8> {
    match hostcalls::get_buffer(buffer, 0, max_bytes) {
        Ok(b) => b.unwrap_or_default(),
        Err(status) => {
            log(
                Level::Warn,
                &format!("idemgate: cannot read buffer {buffer:?}: {status:?}"),
            );
            Vec::new()
        }
    }
}

impl Host for GlueHost<'_> {
    fn request_headers(&self) -> Vec<(String, String)> {
        read_map(MapType::HttpRequestHeaders)
    }

    fn request_header(&self, name: &str) -> Option<String> {
        match hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name) {
            Ok(Some(v)) => Some(header_value(v)),
            Ok(None) => None,
            Err(status) => {
                log(
                    Level::Warn,
                    &format!("idemgate: cannot read header {name}: {status:?}"),
                );
                None
            }
        }
    }

    fn request_body(&self, max_bytes: usize) -> Vec<u8> {
        read_buffer(BufferType::HttpRequestBody, max_bytes)
    }

    fn response_headers(&self) -> Vec<(String, String)> {
        read_map(MapType::HttpResponseHeaders)
    }

    fn set_response_headers(&self, headers: &[(String, String)]) {
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        if let Err(status) = hostcalls::set_map(MapType::HttpResponseHeaders, pairs) {
            log(
                Level::Warn,
                &format!("idemgate: cannot set replay headers: {status:?}"),
            );
        }
    }

    fn response_body(&self, max_bytes: usize) -> Vec<u8> {
        read_buffer(BufferType::HttpResponseBody, max_bytes)
    }

    fn property(&self, path: &[String]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.iter().map(String::as_str).collect())
            .ok()
            .flatten()
    }

    fn dispatch(&self, call: &StoreCall) -> Result<u32, String> {
        let Some(config) = self.config else {
            return Err("the filter has no configuration".into());
        };
        let store = &config.store;
        let headers = vec![
            (":method", "POST"),
            (":path", call.path),
            (":authority", store.authority.as_str()),
            ("content-type", "application/json"),
        ];
        let send = || {
            hostcalls::dispatch_http_call(
                &store.cluster,
                headers,
                Some(&call.body),
                vec![],
                Duration::from_millis(store.timeout_ms),
            )
        };
        // A detached call belongs to the root context, so Envoy does not cancel it when
        // the client's stream ends; its answer still reaches this stream while it lives.
        let result = if call.detached {
            self.as_root(send)
        } else {
            send()
        };
        result.map_err(|status| {
            format!(
                "{status:?} (is the Envoy cluster {:?} defined?)",
                store.cluster
            )
        })
    }

    fn dispatch_upstream(&self, call: UpstreamCall) -> Result<u32, String> {
        let headers: Vec<(&str, &str)> = call
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.as_root(|| {
            hostcalls::dispatch_http_call(
                &call.cluster,
                headers,
                Some(&call.body),
                vec![],
                Duration::from_millis(call.timeout_ms),
            )
        })
        .map_err(|status| {
            format!(
                "{status:?} (is the Envoy cluster {:?} defined?)",
                call.cluster
            )
        })
    }

    fn new_fencing_token(&self) -> String {
        random_hex()
    }

    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn resume_request(&self) {
        if !self.stream_alive {
            return;
        }
        if let Err(status) = abi::continue_stream(abi::HTTP_REQUEST) {
            log(
                Level::Debug,
                &format!("idemgate: resume request: host status {status}"),
            );
        }
    }

    fn resume_response(&self) {
        if !self.stream_alive {
            return;
        }
        if let Err(status) = abi::continue_stream(abi::HTTP_RESPONSE) {
            log(
                Level::Debug,
                &format!("idemgate: resume response: host status {status}"),
            );
        }
    }

    fn local_reply(&self, status: u16, headers: &[(String, String)], body: &[u8]) {
        if !self.stream_alive {
            return;
        }
        if let Err(s) = abi::send_local_response(status, headers, body) {
            log(
                Level::Warn,
                &format!("idemgate: local reply failed: host status {s}"),
            );
        }
    }

    fn count(&self, metric: Metric, delta: i64) {
        self.metrics.increment(metric, delta);
    }

    fn log(&self, level: Level, message: &str) {
        log(level, message);
    }
}

/// Raw hostcalls for the calls made after a store callout answers (resume, local reply):
/// the SDK's wrappers `panic!` on any status but `Ok`, and a stream that went away in the
/// meantime is an expected case, not a reason to trap the VM (Envoy keeps a trapped VM
/// broken). Statuses are read as plain `u32` so an unknown value is never an invalid enum.
#[allow(unsafe_code)]
mod abi {
    /// `StreamType::HttpRequest` of the proxy-wasm ABI.
    pub const HTTP_REQUEST: u32 = 0;
    /// `StreamType::HttpResponse` of the proxy-wasm ABI.
    pub const HTTP_RESPONSE: u32 = 1;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_continue_stream(stream_type: u32) -> u32;
        fn proxy_send_local_response(
            status_code: u32,
            status_code_details_data: *const u8,
            status_code_details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
    }

    /// Resumes the request (`HTTP_REQUEST`) or response (`HTTP_RESPONSE`).
    ///
    /// # Errors
    /// The host's status when it is not `Ok` (0).
    pub fn continue_stream(stream_type: u32) -> Result<(), u32> {
        // SAFETY: an ABI call with a plain integer argument.
        match unsafe { proxy_continue_stream(stream_type) } {
            0 => Ok(()),
            status => Err(status),
        }
    }

    /// Sends a local reply; `headers` are serialized in the ABI's map format
    /// (count, then name/value lengths, then NUL-terminated names and values).
    ///
    /// # Errors
    /// The host's status when it is not `Ok` (0).
    pub fn send_local_response(
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Result<(), u32> {
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        let mut map = Vec::with_capacity(
            4 + headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 10)
                .sum::<usize>(),
        );
        map.extend_from_slice(&len(headers.len()));
        for (n, v) in headers {
            map.extend_from_slice(&len(n.len()));
            map.extend_from_slice(&len(v.len()));
        }
        for (n, v) in headers {
            map.extend_from_slice(n.as_bytes());
            map.push(0);
            map.extend_from_slice(v.as_bytes());
            map.push(0);
        }
        // SAFETY: every pointer/length pair names a live, initialised buffer for the call's
        // duration; the host copies what it needs before returning.
        let status = unsafe {
            proxy_send_local_response(
                u32::from(status),
                std::ptr::null(),
                0,
                body.as_ptr(),
                body.len(),
                map.as_ptr(),
                map.len(),
                -1,
            )
        };
        match status {
            0 => Ok(()),
            s => Err(s),
        }
    }
}
