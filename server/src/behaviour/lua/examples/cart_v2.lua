-- cart, version 2: prices in integer cents and the items as a sorted list of lines.
--
-- State:  { lines = { { sku, qty, unit_cents }, ... } (sorted by sku),
--           status = "open" | "checked_out", checked_out_at = ms }
-- Calls:  { op = "add", sku = "apple", unit_cents = 50, qty = 2 } -> { sku, qty }
--         { op = "remove", sku = "apple", qty = 1 }               -> { sku, qty }
--         { op = "total" }                                        -> { total_cents, count }
--         { op = "checkout" }                                     -> { total_cents, count, at }
--
-- migrate(1, state) turns version 1's { items = { [sku] = { qty, price } } } into lines,
-- converting prices to cents. The engine runs it once per entity at the upgrade.

local function cents(price)
    return math.floor(price * 100 + 0.5)
end

local function find(lines, sku)
    for index, line in ipairs(lines) do
        if line.sku == sku then
            return index, line
        end
    end
    return nil, nil
end

local function total(lines)
    local sum, count = 0, 0
    for _, line in ipairs(lines) do
        sum += line.qty * line.unit_cents
        count += line.qty
    end
    return sum, count
end

local function positive_integer(value, name)
    if value == nil then
        return nil
    end
    if type(value) ~= "number" or value < 1 or value % 1 ~= 0 then
        error({ invalid = name .. " must be a positive integer" })
    end
    return value
end

function init(key, arg)
    -- array() marks the table as a list, so an empty cart stores `lines` as [] rather than {}.
    return { lines = array(), status = "open" }
end

function migrate(from_version, state)
    if from_version ~= 1 then
        error("cart v2 cannot migrate from version " .. tostring(from_version))
    end
    local lines = array()
    for sku, item in pairs(state.items) do
        table.insert(lines, { sku = sku, qty = item.qty, unit_cents = cents(item.price) })
    end
    table.sort(lines, function(a, b)
        return a.sku < b.sku
    end)
    return { lines = lines, status = state.status, checked_out_at = state.checked_out_at }
end

function handle_call(msg, state, ctx)
    local op = msg.op
    if op == "total" then
        local sum, count = total(state.lines)
        return { total_cents = sum, count = count }
    end
    if state.status ~= "open" then
        error({ invalid = "the cart is checked out" })
    end
    if op == "add" then
        if type(msg.sku) ~= "string" or msg.sku == "" then
            error({ invalid = "add needs a sku" })
        end
        local unit_cents = positive_integer(msg.unit_cents, "unit_cents")
        if unit_cents == nil then
            error({ invalid = "add needs unit_cents" })
        end
        local qty = positive_integer(msg.qty, "qty") or 1
        ctx.emit({ type = "added", sku = msg.sku, qty = qty, unit_cents = unit_cents })
        local _, line = find(state.lines, msg.sku)
        return { sku = msg.sku, qty = (if line then line.qty else 0) + qty }
    elseif op == "remove" then
        local _, line = find(state.lines, msg.sku)
        if line == nil then
            error({ invalid = "no such item: " .. tostring(msg.sku) })
        end
        local qty = math.min(positive_integer(msg.qty, "qty") or line.qty, line.qty)
        ctx.emit({ type = "removed", sku = msg.sku, qty = qty })
        return { sku = msg.sku, qty = line.qty - qty }
    elseif op == "checkout" then
        local sum, count = total(state.lines)
        if count == 0 then
            error({ invalid = "the cart is empty" })
        end
        ctx.emit({ type = "checked_out", at = ctx.now })
        return { total_cents = sum, count = count, at = ctx.now }
    end
    error({ invalid = "unknown op: " .. tostring(op) })
end

function handle_cast(msg, state, ctx)
    handle_call(msg, state, ctx)
end

function handle_info(info, state, ctx)
    -- Version 2 watches nothing yet; a monitor's DOWN would arrive here.
end

function apply(state, event)
    local index, line = find(state.lines, event.sku)
    if event.type == "added" then
        if line then
            line.qty += event.qty
            line.unit_cents = event.unit_cents
        else
            table.insert(state.lines, { sku = event.sku, qty = event.qty, unit_cents = event.unit_cents })
            table.sort(state.lines, function(a, b)
                return a.sku < b.sku
            end)
        end
    elseif event.type == "removed" then
        line.qty -= event.qty
        if line.qty <= 0 then
            table.remove(state.lines, index)
        end
    elseif event.type == "checked_out" then
        state.status = "checked_out"
        state.checked_out_at = event.at
    end
    return state
end
