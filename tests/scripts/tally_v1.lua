-- tally, version 1: a counter kept as { n = N }. Replies say which version answered.
function init(key, arg)
    return { n = 0 }
end

-- Rolling back from version 2 brings its state back to this shape.
function migrate(from_version, state)
    return { n = state.count }
end

function handle_call(msg, state, ctx)
    if msg.op == "incr" then
        ctx.emit({ by = 1 })
        return { version = 1, value = state.n + 1 }
    elseif msg.op == "get" then
        return { version = 1, value = state.n }
    end
    error({ invalid = "unknown op: " .. tostring(msg.op) })
end

function apply(state, event)
    state.n += event.by
    return state
end
