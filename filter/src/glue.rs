//! The proxy-wasm glue: adapts Envoy's callbacks to [`Exchange`] through [`GlueHost`].
//!
//! Hostcalls go through `proxy_wasm::hostcalls::*`, which return `Result`, and maps are
//! read as bytes (`get_map_bytes`): the SDK's string helpers `unwrap()` and would trap the
//! VM on a non-UTF-8 header value. A failed hostcall becomes "absent" plus a log line.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::config::Config;
use crate::exchange::{Exchange, Flow, OPAQUE_VALUE_PREFIX};
use crate::host::{Host, Level, Metric, StoreCall, StoreReply};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("idemgate filter panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(IdemRoot { context_id, config: None, metrics: Rc::new(Metrics::default()) })
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

struct IdemRoot {
    context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
}

impl Context for IdemRoot {}

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

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(IdemHttp {
            env: HttpEnv {
                context_id,
                root_id: self.context_id,
                config: self.config.clone(),
                metrics: self.metrics.clone(),
            },
            exchange: Exchange::new(self.config.clone()),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct IdemHttp {
    env: HttpEnv,
    exchange: Exchange,
}

/// What a stream's [`GlueHost`] is built from.
struct HttpEnv {
    context_id: u32,
    root_id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
}

impl HttpEnv {
    fn host(&self) -> GlueHost<'_> {
        GlueHost {
            context_id: self.context_id,
            root_id: self.root_id,
            config: self.config.as_deref(),
            metrics: &self.metrics,
        }
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for IdemHttp {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let reply = if num_headers == 0 {
            StoreReply {
                status: None,
                body: Vec::new(),
            }
        } else {
            let status = read_map(MapType::HttpCallResponseHeaders)
                .into_iter()
                .find(|(n, _)| n == ":status")
                .and_then(|(_, v)| v.parse::<u16>().ok());
            let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
                Ok(b) => b.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            StoreReply { status, body }
        };
        let host = self.env.host();
        self.exchange.on_store_reply(&host, token_id, reply);
    }

    fn on_done(&mut self) -> bool {
        let host = self.env.host();
        self.exchange.on_done(&host);
        true
    }
}

impl HttpContext for IdemHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let host = self.env.host();
        action(self.exchange.on_request_headers(&host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let host = self.env.host();
        action(
            self.exchange
                .on_request_body(&host, body_size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let host = self.env.host();
        action(self.exchange.on_request_trailers(&host))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let host = self.env.host();
        action(self.exchange.on_response_headers(&host, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let host = self.env.host();
        action(
            self.exchange
                .on_response_body(&host, body_size, end_of_stream),
        )
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let host = self.env.host();
        action(self.exchange.on_response_trailers(&host))
    }
}

/// [`Host`] over proxy-wasm hostcalls for one HTTP context.
struct GlueHost<'a> {
    context_id: u32,
    root_id: u32,
    config: Option<&'a Config>,
    metrics: &'a Metrics,
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

    fn dispatch(&self, call: StoreCall) -> Result<u32, String> {
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
        // A detached call belongs to the root context, so Envoy does not cancel it when
        // the client's stream ends; its answer still reaches this stream while it lives.
        let detached = call.detached && hostcalls::set_effective_context(self.root_id).is_ok();
        let result = hostcalls::dispatch_http_call(
            &store.cluster,
            headers,
            Some(&call.body),
            vec![],
            Duration::from_millis(store.timeout_ms),
        );
        if detached {
            let _ = hostcalls::set_effective_context(self.context_id);
        }
        result.map_err(|status| {
            format!(
                "{status:?} (is the Envoy cluster {:?} defined?)",
                store.cluster
            )
        })
    }

    fn resume_request(&self) {
        if let Err(status) = abi::continue_stream(abi::HTTP_REQUEST) {
            log(
                Level::Debug,
                &format!("idemgate: resume request: host status {status}"),
            );
        }
    }

    fn resume_response(&self) {
        if let Err(status) = abi::continue_stream(abi::HTTP_RESPONSE) {
            log(
                Level::Debug,
                &format!("idemgate: resume response: host status {status}"),
            );
        }
    }

    fn local_reply(&self, status: u16, headers: &[(String, String)], body: &[u8]) {
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
